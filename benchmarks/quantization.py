"""Quantised bases (issue 20) on the embedded SmolLM2-135M, on the CPU.

    python benchmarks/quantization.py cost  --out runs/bench-quant/cost.json    # load, memory, step: none/nf4/int8
    python benchmarks/quantization.py drift --out runs/bench-quant/drift.json   # 5 rounds: the chain beside vs merged into the base
    python benchmarks/quantization.py loss  --out runs/bench-quant/loss.json --seeds 0 1 2   # held-out loss, all fp32 vs mixed

`cost` measures each quantisation in a fresh process (imports done before the clock starts): the
wall and CPU seconds of `load_model`, the weights' bytes (transformers' `get_memory_footprint`),
and the seconds of a LoRA training step (rank 8 on q_proj and v_proj, batch 8, the embedded task at
data.max_length 128, fp32 compute) after one warm-up step.

`drift` merges 5 rounds of rank-8 updates, each 1% of its weight's norm, into every q_proj and
v_proj: in full precision (the reference), held beside an nf4 base (florist), and merged into nf4
and int8 weights by de-quantising, adding and re-quantising (the naive way). Per round it reports
the largest entry of (site's effective weight - reference - the base's own quantisation error),
and the same relative to the updates' sum.

`loss` runs the same small federation twice per seed on the inline engine: 3 sites all in full
precision, and the same 3 sites as nf4, int8 and full precision (their node configs'
`quantization`); the server's held-out loss after the last round, in full precision.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("none", "nf4", "int8")
ROUNDS = 5
LOSS_SETTINGS = [
    'model.autocast="none"',
    "federation.num_clients=3",
    "federation.ranks=[8, 16, 32]",
    "federation.rounds=3",
    "data.examples_per_category=4",
    "data.test_per_category=2",
    "data.min_client_examples=2",
    "data.max_length=64",
    "training.local_steps=3",
    "training.batch_size=4",
    "evaluation.max_new_tokens=4",
    "evaluation.base=false",
    'federation.engine="inline"',
]
MIXED = ("nf4", "int8", "none")


def cost_of(kind: str) -> dict:
    from florist.config import RunConfig
    from florist.data.tokenize import encode
    from florist.federation.datasets import federated_data
    from florist.lora.model import attach_lora
    from florist.models import EMBEDDED_MODEL, load_model
    from florist.training import train_lora

    config = RunConfig()
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    model, tokenizer = load_model(EMBEDDED_MODEL, "cpu", kind)
    load = {"load_wall_s": time.perf_counter() - start_wall, "load_cpu_s": time.process_time() - start_cpu}
    weights_mib = model.get_memory_footprint() / 2**20
    model.requires_grad_(False)
    features = [encode(tokenizer, e, config.data.template, config.data.max_length) for e in federated_data(config).clients[0]]
    peft_model = attach_lora(model, 8, 16.0, ["q_proj", "v_proj"])
    options = dict(batch_size=8, learning_rate=3e-3, weight_decay=0.0, grad_clip=1.0, seed=0, pad_token_id=tokenizer.pad_token_id, autocast=False)
    train_lora(peft_model, features, steps=1, **options)
    steps = 5
    result = train_lora(peft_model, features, steps=steps, **options)
    return {
        "quantization": kind,
        **load,
        "weights_mib": weights_mib,
        "step_s": result.seconds / steps,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def cost(out: Path) -> list[dict]:
    rows = []
    for kind in KINDS:
        # A fresh process per quantisation: its load time and peak memory are its own.
        text = subprocess.run([sys.executable, __file__, "cost-one", kind], check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(text.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    return rows


@torch.no_grad()
def drift(out: Path) -> dict:
    import bitsandbytes.functional as bnb

    from florist.aggregation import GlobalModule
    from florist.lora.beside import held_beside
    from florist.lora.model import merge_into_base
    from florist.models import EMBEDDED_MODEL, load_model
    from florist.quantization import dequantised_weight

    full, _ = load_model(EMBEDDED_MODEL)
    names = [name for name, _ in full.named_modules() if name.endswith(("q_proj", "v_proj"))]
    pristine = {name: full.get_submodule(name).weight.clone() for name in names}
    generator = torch.Generator().manual_seed(0)
    chain = []
    for _ in range(ROUNDS):
        update = {}
        for name, w in pristine.items():
            a, b = torch.randn(8, w.shape[1], generator=generator), torch.randn(w.shape[0], 8, generator=generator)
            update[name] = GlobalModule(A=a, B=b, scale=0.01 * w.norm().item() / (b @ a).norm().item())
        chain.append(update)

    def requantised(kind: str, weight: torch.Tensor) -> torch.Tensor:
        if kind == "nf4":
            return bnb.dequantize_4bit(*bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4"))
        rows, scales, _ = bnb.int8_vectorwise_quant(weight.half())
        return rows.float() * (scales.float()[:, None] / 127)

    quantised, _ = load_model(EMBEDDED_MODEL, "cpu", "nf4")
    base_error = {
        "nf4": {n: dequantised_weight(quantised.get_submodule(n)) - pristine[n] for n in names},
        "int8": {n: requantised("int8", pristine[n]) - pristine[n] for n in names},
    }
    naive = {kind: {n: requantised(kind, pristine[n]) for n in names} for kind in ("nf4", "int8")}
    rows = []
    for t in range(ROUNDS + 1):
        reference = {n: pristine[n] + sum((u[n].delta() for u in chain[:t]), torch.zeros_like(pristine[n])) for n in names}
        moved = max((reference[n] - pristine[n]).abs().max().item() for n in names) or 1.0
        effective = {}
        for n in names:
            layer = quantised.get_submodule(n)
            terms = held_beside(layer)
            effective[n] = dequantised_weight(layer) + (terms[1] @ terms[0] if terms else 0)

        def off(weights, error):
            return max((weights[n] - reference[n] - error[n]).abs().max().item() for n in names)

        row = {"round": t, "update_max": moved, "beside_nf4": off(effective, base_error["nf4"])}
        for kind in ("nf4", "int8"):
            row[f"merged_{kind}"] = off(naive[kind], base_error[kind])
        rows.append(row)
        print(row, flush=True)
        if t < ROUNDS:
            merge_into_base(quantised, chain[t])
            naive = {kind: {n: requantised(kind, naive[kind][n] + chain[t][n].delta()) for n in names} for kind in naive}
    return {"rounds": rows, "base_error_max": {k: max(e.abs().max().item() for e in v.values()) for k, v in base_error.items()}}


def loss(out: Path, seeds: list[int]) -> list[dict]:
    from florist.config import load_config
    from florist.federation.client_app import build_client_app
    from florist.federation.inline import InlineGrid, simulated_nodes
    from florist.federation.server_app import serve
    from florist.federation.simulation import prepare, quiet_third_parties

    quiet_third_parties()
    rows = []
    for seed in seeds:
        for label, kinds in (("full", ("none",) * 3), ("mixed", MIXED)):
            run_dir = out.parent / f"loss-{label}-seed{seed}"
            config = prepare(load_config(None, [*LOSS_SETTINGS, f"training.seed={seed}", f"output.run_dir={json.dumps(str(run_dir))}"]))
            nodes = simulated_nodes(3)
            for node, kind in zip(sorted(nodes), kinds, strict=True):
                nodes[node].update(quantization=kind, threads=1)  # one thread: the machine is shared
            start = time.perf_counter()
            serve(config, InlineGrid(build_client_app(config), nodes))
            summary = json.loads((run_dir / "summary.json").read_text())
            rows.append({"seed": seed, "sites": label, "test_loss": summary["final"]["test_loss"], "wall_s": time.perf_counter() - start})
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["cost", "cost-one", "drift", "loss"])
    parser.add_argument("kind", nargs="?", choices=KINDS)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-quant" / "result.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if args.what == "cost-one":
        print(json.dumps(cost_of(args.kind)))
        return
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"cost": lambda: cost(args.out), "drift": lambda: drift(args.out), "loss": lambda: loss(args.out, args.seeds)}[args.what]()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
