"""The ClientApp: start from the global state, train this client's LoRA, send its factors back."""

from __future__ import annotations

import os

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from florist.config import RunConfig
from florist.federation import payload
from florist.federation.settings import config_from_run_config
from florist.federation.workspace import Update, workspace_for
from florist.federation.resources import peak_rss_mib
from florist.lora.model import attach_lora, freeze_shared_A, load_global, read_factors
from florist.training import train_lora

UPDATE_PREFIX = "update:"


def remember_updates(state: RecordDict, content: RecordDict) -> list[Update]:
    """Store the merged global updates this message brings in the node's state; return them all.

    The server sends each update once per node, so the node's state holds the whole chain,
    from which any worker process can rebuild the merged base.
    """
    for key in payload.payload_keys(content, UPDATE_PREFIX):
        state[key], state[f"{key}:scales"] = content[key], content[f"{key}:scales"]
    keys = sorted(payload.payload_keys(state, UPDATE_PREFIX), key=lambda key: int(key.removeprefix(UPDATE_PREFIX)))
    return [(key, payload.take_global(state, key)) for key in keys]


def train_round(config: RunConfig, msg: Message, context: Context) -> Message:
    federation, training = config.federation, config.training
    partition = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["round"])
    # One worker per core: more threads per worker oversubscribe the cores (EMBEDDED.md).
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // federation.workers))
    workspace = workspace_for(config, msg.metadata.run_id)

    model = workspace.base_after(remember_updates(context.state, msg.content))
    seed = hash((training.seed, server_round, partition)) % 2**31
    # peft draws the fresh A from torch's global generator, whose state would otherwise depend on
    # which clients this worker process happened to run before: seeding it makes runs repeatable.
    torch.manual_seed(seed)
    rank = federation.rank_of(partition)
    model = attach_lora(model, rank, federation.alpha_of(partition), config.model.target_modules, federation.use_rslora)
    frozen_a = config.aggregation.method == "ffa"
    if frozen_a:
        freeze_shared_A(model, federation.ffa_seed)
    if "global" in msg.content:
        load_global(model, payload.take(msg.content, "global"))

    features = workspace.client_features(partition)
    result = train_lora(
        model,
        features,
        steps=training.local_steps,
        batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        weight_decay=training.weight_decay,
        grad_clip=training.grad_clip,
        seed=seed,
        pad_token_id=workspace.tokenizer.pad_token_id,
        autocast=workspace.precision.autocast,
    )
    reply = RecordDict()
    # FFA-LoRA's A is frozen and derivable from the shared seed: only B travels.
    payload.put(reply, "adapter", read_factors(model), federation.wire_dtype, factors="B" if frozen_a else "AB")
    reply["metrics"] = MetricRecord(
        {
            "num-examples": len(features),
            "partition-id": partition,
            "rank": rank,
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-tokens": result.tokens,
            "train-seconds": result.seconds,
            "peak-rss-mib": peak_rss_mib(),
        }
    )
    print(
        f"round {server_round} client {partition}: rank {rank}, {len(features)} examples, "
        f"loss {result.loss:.3f}, {result.seconds:.1f} s",
        flush=True,
    )
    return Message(reply, reply_to=msg)


def build_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to `config`, or reading it from the run config when None (flwr run)."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_round(config or config_from_run_config(context.run_config), msg, context)

    return app


app = build_client_app()
