"""The ClientApp: check the instruction, bring the base up to date, then train or evaluate.

Before any work a node checks the instruction against its own policy (federation/node_policy.py:
else it replies with the refusal as its error), that the server runs with its settings and base
model (else it replies `mismatch`), and that it holds every merged update of the chain (else it
replies `gap` with the first it lacks, and the server sends the rest). It never trains on a base
that silently misses an update.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable

import torch
from flwr.app import ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from florist.aggregation import GlobalModule, change_since_start, cut, start_of, truncate_update
from florist.config import RunConfig
from florist.evaluation import evaluate, instruction_loss
from florist.federation import payload
from florist.federation.delivery import GlobalUpdate, apply_update, update_digest
from florist.federation.evaluation_sums import EvaluationSums, layout_categories
from florist.federation.messages import (
    ADAPTER,
    CANDIDATE,
    CUTS,
    EVALUATED,
    GAP,
    GLOBAL,
    IDENTITY,
    METRICS,
    MISMATCH,
    SECURE_SUM,
    SECURE_SUM_ACTION,
    SCORED,
    TRAINED,
    UPDATE_PREFIX,
    Instruction,
    update_key,
)
from florist.federation.node import NodeSettings, node_data
from florist.federation.node_config import Refused
from florist.federation.node_policy import NodePolicy, node_policy
from florist.federation.resources import peak_rss_mib
from florist.federation.sketch_round import SketchRound, put_upload, site_upload
from florist.federation.secure_site import answer_evaluation_setup, answer_setup, evaluation_setup, secure_sum_stage
from florist.federation.secure_sum import ProtocolRefused
from florist.federation.training_totals import CLEAR_METRICS, with_totals
from florist.federation.workspace import Update, Workspace, workspace_for
from florist.lora.model import attach_lora, freeze_shared_A, frozen_lora_A, load_dense, load_global, merge_into_base, move_into_lora, read_dense, read_factors
from florist.training import train_lora

CHAIN_DIGESTS = "chain-digests"
"""The node state's record of the digest of every update it holds."""


def remember_updates(state: RecordDict, content: RecordDict) -> None:
    """Keep the merged updates this message brings in the node's state, with their digests."""
    for key in payload.payload_keys(content, UPDATE_PREFIX):
        state[key], state[f"{key}:scales"] = content[key], content[f"{key}:scales"]
        _hold(state, key, update_digest(payload.take_global(content, key)))


def _hold(state: RecordDict, key: str, digest: str) -> None:
    """Record in the node's state that it holds update `key`, with this digest."""
    digests = state.get(CHAIN_DIGESTS, ConfigRecord())
    digests[key] = digest
    state[CHAIN_DIGESTS] = digests


def held_chain(state: RecordDict, digests: list[str]) -> list[Update] | int:
    """The updates 1..t-1 the server lists, from the node's state; or the first one it lacks."""
    held = state.get(CHAIN_DIGESTS, ConfigRecord())
    chain = []
    for index, digest in enumerate(digests, start=1):
        key = update_key(index)
        if held.get(key) != digest and not _cut_of_candidate(state, key, digest):
            return index
        chain.append((digest, payload.take_global(state, key)))
    return chain


CANDIDATE_KEYS = (CANDIDATE, f"{CANDIDATE}:scales", CUTS)


def keep_candidate(state: RecordDict, content: RecordDict) -> None:
    """Keep the candidate this node scored: the update the server keeps is one of its cuts, which
    the node then takes from here instead of downloading it again."""
    for key in CANDIDATE_KEYS:
        state[key] = content[key]


def _cut_of_candidate(state: RecordDict, key: str, digest: str) -> bool:
    """Whether the update with this digest is a cut of the kept candidate; if so, it is kept as `key`."""
    if CANDIDATE not in state:
        return False
    candidate = payload.take_global(state, CANDIDATE)
    for ranks in json.loads(str(state[CUTS]["ranks"])):
        update = GlobalUpdate(cut(candidate.modules, ranks), candidate.dense)
        if update_digest(update) == digest:
            payload.put(state, key, update.modules, "float32", dense=update.dense)  # lossless: the digest holds
            _hold(state, key, digest)
            for kept in CANDIDATE_KEYS:
                del state[kept]
            return True
    return False


def _reply(
    msg: Message, workspace: Workspace, status: str, metrics: dict, adapter: dict | None = None, dense: dict | None = None,
    sketch: dict | None = None, keys: ConfigRecord | None = None,
) -> Message:
    """The reply; a trained one carries the client's LoRA factors and its tensors trained in full,
    or under florist-secure its sketches (federation/secure.py), which the server only sums, or with
    the secure sum its public keys (federation/secure_site.py: the sketches follow masked)."""
    content = RecordDict({IDENTITY: workspace.identity.record(status), METRICS: MetricRecord(metrics)})
    if sketch is not None:
        put_upload(content, sketch)
    if keys is not None:
        content[SECURE_SUM] = keys
    if adapter is not None:
        # FFA-LoRA's A is frozen and derivable from the shared seed: only B travels.
        factors = "B" if workspace.config.aggregation.method == "ffa" else "AB"
        payload.put(content, ADAPTER, adapter, workspace.config.wire.upload, factors=factors, dense=dense)
    return Message(content, reply_to=msg)


Stage = Callable[[RunConfig, NodePolicy, NodeSettings, Instruction, Message, Context], Message]


def _answer(stage: Stage, config: RunConfig | None, msg: Message, context: Context) -> Message:
    """One instruction under the node's policy.

    `config`: `florist run`'s own, whose nodes allow what it asks; None on a SuperNode, which takes
    the shared settings from the instruction and everything else from its node config. A refusal
    is the reply's error, one line. A SuperNode's other failures reply only their type: their text
    may quote its files, and stays in its own log."""
    in_process = config is not None
    try:
        policy = NodePolicy.for_run(context.node_config, config) if in_process else node_policy(context.node_config)
        instruction = policy.read_instruction(msg)
        config = config if in_process else policy.run_config(instruction.settings)
        return stage(config, policy, policy.admit(config), instruction, msg, context)
    except (Refused, ProtocolRefused) as refusal:
        print(f"node {context.node_id}: refused: {refusal}", flush=True)
        return _error(msg, str(refusal))
    except Exception as error:
        if in_process:
            raise
        traceback.print_exc()
        return _error(msg, f"the node failed ({type(error).__name__}); its own log has the details")


def _error(msg: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)


def _prepare(
    config: RunConfig, policy: NodePolicy, node: NodeSettings, instruction: Instruction, msg: Message, context: Context
) -> tuple[Workspace, Message | list[Update]]:
    """The node's workspace, and either its chain of updates or the reply that ends the stage."""
    torch.set_num_threads(node.threads)
    if config.training.deterministic:
        torch.use_deterministic_algorithms(True)
    workspace = workspace_for(config, msg.metadata.run_id, node.device, node.quantization)
    identity = workspace.identity
    policy.check_model(workspace.model, identity.model_digest, config)
    base = {"round": instruction.round, "partition-id": node.partition}
    if (instruction.fingerprint, instruction.model_digest) != (identity.fingerprint, identity.model_digest):
        print(f"round {instruction.round} client {node.partition}: settings or base model differ from the server's", flush=True)
        return workspace, _reply(msg, workspace, MISMATCH, base)
    remember_updates(context.state, msg.content)
    chain = held_chain(context.state, instruction.chain)
    if isinstance(chain, int):
        print(f"round {instruction.round} client {node.partition}: lacks update {chain}, asking the server", flush=True)
        return workspace, _reply(msg, workspace, GAP, base | {"needs-update": chain})
    return workspace, chain


def train_round(config: RunConfig | None, msg: Message, context: Context) -> Message:
    return _answer(_train, config, msg, context)


def evaluate_round(config: RunConfig | None, msg: Message, context: Context) -> Message:
    """Score the global model (base, chain, and the global adapter if any) on this site's held-out examples."""
    return _answer(_evaluate, config, msg, context)


def score_round(config: RunConfig | None, msg: Message, context: Context) -> Message:
    """Automatic tau: this site's validation loss for every candidate cut of the exact update,
    from the smallest to the largest (each adds components to the last, merged in turn).

    Under florist-secure the site refuses (`_score`), whatever the server says the request is for:
    the candidate and its cuts are whatever the server sends, which a site that never sees the
    other sites' updates cannot check against the round's sum, so each cut's loss answers a query
    of the server's choosing about the site's validation data (a loss oracle). Limiting the answer
    to a sum over the sites would not close it: the server picks the queries, as many per round
    as it likes, and a sum of few sites is close to one site's answer. Automatic tau is refused
    under florist-secure by the configuration as well; this is the check an honest site makes of
    a server that sends the request anyway."""
    return _answer(_score, config, msg, context)


def _train(config: RunConfig, policy: NodePolicy, node: NodeSettings, instruction: Instruction, msg: Message, context: Context) -> Message:
    sketch_round = SketchRound.read(msg) if config.aggregation.secure else None
    if sketch_round is not None:
        policy.privacy.check_round(config, sketch_round, instruction.round)
    workspace, chain = _prepare(config, policy, node, instruction, msg, context)
    if isinstance(chain, Message):
        return chain
    training = config.training
    warm = config.federation.warm_start and len(chain) > 0
    # A warm start changes the base weights: it takes a copy, not the workspace's merged model.
    model = workspace.base_after(chain) if warm else workspace.base_to_train(chain)
    seed = hash((training.seed, instruction.round, node.partition)) % 2**31
    # peft draws the fresh A from torch's global generator, whose state would otherwise depend on
    # which clients this worker process happened to run before: seeding it makes runs repeatable.
    torch.manual_seed(seed)
    settings = config.model
    model = attach_lora(
        model, node.rank, node.alpha, settings.target_modules, config.federation.use_rslora, settings.lora_bias, settings.modules_to_save
    )
    if config.aggregation.method == "ffa":
        freeze_shared_A(model, config.federation.ffa_seed)
    if GLOBAL in msg.content:
        load_global(model, payload.take(msg.content, GLOBAL))
        load_dense(model, payload.take_dense(msg.content, GLOBAL))
    start = start_of(chain[-1][1].modules, node.rank) if warm else None
    if start is not None:
        move_into_lora(model, start)

    features = workspace.features(node.partition, node_data(config, node).train)
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
        gradient_checkpointing=training.gradient_checkpointing,
    )
    metrics = {
        "round": instruction.round,
        "partition-id": node.partition,
        "chain-length": len(chain),
        "num-examples": len(features),
        "rank": node.rank,
        "train-loss": result.loss,
        "train-steps": result.steps,
        "train-tokens": result.tokens,
        "train-seconds": result.seconds,
        "peak-rss-mib": peak_rss_mib(),
    }
    print(
        f"round {instruction.round} client {node.partition}: rank {node.rank}, {len(features)} examples, "
        f"loss {result.loss:.3f}, {result.seconds:.1f} s",
        flush=True,
    )
    factors = read_factors(model)
    if start is not None:
        # The server derives the start itself: on the wire, factors of the size of what was learned.
        factors = change_since_start(factors, start)
    if config.wire.client_tau < 1:
        factors = {name: truncate_update(f, config.wire.client_tau) for name, f in factors.items()}
    if config.aggregation.secure:
        sketch, privacy = site_upload(config, sketch_round, factors, len(features))
        if config.privacy.dp:  # recorded once the noise is drawn, before anything of it leaves
            policy.privacy.spend(config, sketch_round, msg.metadata.run_id, instruction.round)
        if config.privacy.secure_aggregation:
            clipped = privacy.get("dp-clip-factor", 1.0) < 1
            summed = with_totals(sketch, len(features), result.tokens, result.loss, clipped)
            keys = answer_setup(context, msg.content[SECURE_SUM], summed)
            return _reply(msg, workspace, TRAINED, {key: metrics[key] for key in CLEAR_METRICS}, keys=keys)
        return _reply(msg, workspace, TRAINED, metrics | privacy, sketch=sketch)
    return _reply(msg, workspace, TRAINED, metrics, factors, read_dense(model))


def _evaluate(config: RunConfig, policy: NodePolicy, node: NodeSettings, instruction: Instruction, msg: Message, context: Context) -> Message:
    setup = evaluation_setup(msg) if config.aggregation.secure and config.privacy.secure_aggregation else None  # checked before the work
    workspace, chain = _prepare(config, policy, node, instruction, msg, context)
    if isinstance(chain, Message):
        return chain
    model = workspace.base_after(chain)
    if GLOBAL in msg.content:
        apply_update(model, _global_update(config, msg, workspace))
    data = node_data(config, node)
    held_out = data.held_out
    results = {}
    if held_out:
        results = evaluate(
            model,
            workspace.tokenizer,
            examples=held_out,
            template=config.data.template,
            max_new_tokens=config.evaluation.max_new_tokens,
            max_length=config.data.max_length,
            batch_size=config.evaluation.batch_size,
        )
        results = {key: value for key, value in results.items() if isinstance(value, (int, float))}
    loss = None
    if data.validation:
        loss = instruction_loss(
            model, workspace.tokenizer, data.validation, template=config.data.template,
            max_length=config.data.max_length, batch_size=config.evaluation.batch_size,
        )
    metrics = {"round": instruction.round, "partition-id": node.partition, "chain-length": len(chain)}
    print(f"round {instruction.round} client {node.partition}: evaluated on {len(held_out)} held-out examples", flush=True)
    if config.aggregation.secure:
        minimum = policy.category_minimum(config)
        sums = EvaluationSums.of_site(results, loss, held_out, minimum)
        if setup is not None:  # the sums masked, in the layout every site sends (federation/evaluation_sums.py)
            sums = sums.in_layout(layout_categories(setup.layout))
        if sums.withheld_categories:
            why = f"of fewer than {minimum} examples" + (" or outside the run's" if setup is not None else "")
            print(f"round {instruction.round} client {node.partition}: withheld {sums.withheld_categories} categories {why}", flush=True)
        if setup is not None:
            return _reply(msg, workspace, EVALUATED, metrics, keys=answer_evaluation_setup(context, setup, sums))
        return _reply(msg, workspace, EVALUATED, metrics | sums.record())
    scores = policy.shareable(results, held_out)
    if loss is not None:
        scores.update(val_loss=loss.mean_nll, val_tokens=loss.tokens)
    return _reply(msg, workspace, EVALUATED, metrics | {"num-examples": len(held_out)} | scores)


def _score(config: RunConfig, policy: NodePolicy, node: NodeSettings, instruction: Instruction, msg: Message, context: Context) -> Message:
    if config.aggregation.secure:
        raise Refused(
            'aggregation.method = "florist-secure": this site scores no server-chosen cuts '
            "(one validation loss per cut the server sends is a loss oracle on its data)"
        )
    workspace, chain = _prepare(config, policy, node, instruction, msg, context)
    if isinstance(chain, Message):
        return chain
    model = workspace.base_after(chain)
    candidate = payload.take_global(msg.content, CANDIDATE)
    keep_candidate(context.state, msg.content)
    # Every cut comes with the round's tensors trained in full: they are part of whichever update is kept.
    load_dense(model, candidate.dense)
    exact = candidate.modules
    cuts = json.loads(str(msg.content[CUTS]["ranks"]))
    validation = node_data(config, node).validation
    metrics = {"round": instruction.round, "partition-id": node.partition, "chain-length": len(chain)}
    held = {name: 0 for name in exact}
    tokens = 0
    for index, ranks in enumerate(cuts):
        added = {
            name: GlobalModule(A=module.A[held[name] : ranks[name]], B=module.B[:, held[name] : ranks[name]], scale=module.scale)
            for name, module in exact.items()
        }
        merge_into_base(model, added)
        held = {name: max(held[name], ranks[name]) for name in held}
        if validation:
            loss = instruction_loss(
                model, workspace.tokenizer, validation, template=config.data.template,
                max_length=config.data.max_length, batch_size=config.evaluation.batch_size,
            )
            metrics[f"loss-{index}"], tokens = loss.mean_nll, loss.tokens
        else:
            metrics[f"loss-{index}"] = 0.0
    print(f"round {instruction.round} client {node.partition}: scored {len(cuts)} cuts on {len(validation)} validation examples", flush=True)
    return _reply(msg, workspace, SCORED, metrics | {"tokens": tokens})


def _global_update(config: RunConfig, msg: Message, workspace: Workspace) -> GlobalUpdate:
    """The global adapter as an update to merge; FFA-LoRA's A is re-derived from the shared seed."""
    modules = {}
    for name, module in payload.take(msg.content, GLOBAL).items():
        a = module.get("A")
        if a is None:
            in_features = workspace.model.get_submodule(name).in_features
            a = frozen_lora_A(name, module["B"].shape[1], in_features, config.federation.ffa_seed)
        modules[name] = GlobalModule(A=a, B=module["B"], scale=module["scale"])
    return GlobalUpdate(modules, payload.take_dense(msg.content, GLOBAL))


def build_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to `florist run`'s `config`, or, when None (a SuperNode under `flwr run`),
    taking the shared settings from each instruction under the node's own policy."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_round(config, msg, context)

    @app.train(SECURE_SUM_ACTION)
    def secure_sum(msg: Message, context: Context) -> Message:
        return secure_sum_stage(msg, context)

    @app.evaluate()
    def evaluate_(msg: Message, context: Context) -> Message:
        return evaluate_round(config, msg, context)

    @app.query()
    def score(msg: Message, context: Context) -> Message:
        return score_round(config, msg, context)

    return app


app = build_client_app()
