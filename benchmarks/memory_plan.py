"""`florist plan`'s peak against the peak a training step really reaches, on the embedded model (issue 20).

Each setting runs in a fresh Python process: it imports torch, transformers and florist, reads its
resident set (the baseline), loads SmolLM2-135M-Instruct in float32, wraps it with the LoRA, then
trains `--steps` steps on batches of full-length sequences labelled at every position (the batch the
plan assumes). The measured peak is the process's high-water mark (VmHWM) above the baseline: it
includes the weights, which stay resident. glibc's mmap threshold is lowered first, so freed large
blocks go back to the kernel and the high-water mark is the tensors', not the allocator's leftovers.

    python benchmarks/memory_plan.py --out benchmarks/results/memory_plan.json

A miss beyond --tolerance (default 0.25) is listed; the exit status is 1 if any.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.table import Table

from florist.printing import make_console

MIB = 2**20


@dataclass(frozen=True)
class Setting:
    rank: int
    max_length: int
    batch_size: int
    gradient_checkpointing: bool
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    autocast: bool = False
    """bf16 autocast over the float32 weights (native on the reference CPU: avx512_bf16)."""

    def label(self) -> str:
        targets = "qv" if self.target_modules == ("q_proj", "v_proj") else "all 7"
        flags = (" bf16" if self.autocast else " fp32") + (" ckpt" if self.gradient_checkpointing else "")
        return f"rank {self.rank}, length {self.max_length}, batch {self.batch_size}, {targets}{flags}"


ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETTINGS = [
    Setting(8, 128, 8, False),
    Setting(8, 128, 8, True),
    Setting(64, 128, 8, False),
    Setting(8, 64, 2, False),
    Setting(8, 512, 4, False),
    Setting(8, 512, 4, True),
    Setting(16, 256, 4, False, ALL_PROJECTIONS),
    Setting(16, 256, 4, True, ALL_PROJECTIONS),
    Setting(8, 128, 8, False, autocast=True),
    Setting(8, 128, 8, True, autocast=True),
    Setting(16, 256, 4, False, ALL_PROJECTIONS, autocast=True),
]


def measure(setting: Setting, steps: int) -> dict:
    """In this (fresh) process: the peak resident memory of `steps` training steps above the
    resident set before the model was loaded, and the weights' share of it."""
    import torch

    from florist.federation.resources import proc_status_kib, reset_peak_rss, set_mmap_threshold
    from florist.lora.model import attach_lora
    from florist.models import EMBEDDED_MODEL, load_model
    from florist.training import train_lora

    set_mmap_threshold(64 * 2**10)
    torch.manual_seed(0)
    gc.collect()
    baseline = proc_status_kib("VmRSS")
    model, tokenizer = load_model(EMBEDDED_MODEL)
    model = attach_lora(model, setting.rank, 2.0 * setting.rank, setting.target_modules)
    ids = torch.randint(0, model.config.vocab_size, (setting.batch_size, setting.max_length)).tolist()
    features = [{"input_ids": row, "labels": row} for row in ids]
    gc.collect()
    loaded = proc_status_kib("VmRSS")
    if not reset_peak_rss():
        raise OSError("/proc/self/clear_refs cannot be written: no peak to measure")
    start = time.perf_counter()
    train_lora(
        model, features, steps=steps, batch_size=setting.batch_size, learning_rate=1e-3, weight_decay=0.0, grad_clip=1.0,
        seed=0, pad_token_id=tokenizer.pad_token_id, autocast=setting.autocast, gradient_checkpointing=setting.gradient_checkpointing,
    )
    seconds = time.perf_counter() - start
    peak = proc_status_kib("VmHWM")
    return {"loaded_bytes": (loaded - baseline) * 1024, "peak_bytes": (peak - baseline) * 1024, "seconds": seconds}


def planned(setting: Setting) -> dict:
    from transformers import AutoConfig

    from florist.models import EMBEDDED_MODEL, resolve_model
    from florist.planning import ModelShape, SiteTraining, site_memory

    shape = ModelShape.from_config(AutoConfig.from_pretrained(resolve_model(EMBEDDED_MODEL)))
    training = SiteTraining(
        rank=setting.rank, target_modules=setting.target_modules, trained_in_full=0, batch_size=setting.batch_size,
        max_length=setting.max_length, quantization="none", autocast=setting.autocast, gradient_checkpointing=setting.gradient_checkpointing,
    )
    memory = site_memory(shape, training)
    return {"planned_bytes": memory.peak, "planned_parts": memory.parts()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    parser.add_argument("--steps", type=int, default=1, help="training steps per setting (AdamW's moments, a few MiB here, come at the first)")
    parser.add_argument("--tolerance", type=float, default=0.25)
    parser.add_argument("--limit", type=int, help="measure only the first LIMIT settings")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a setting as JSON: measure it in this process
    args = parser.parse_args()
    if args.one:
        fields = json.loads(args.one)
        setting = Setting(**{**fields, "target_modules": tuple(fields["target_modules"])})
        print(json.dumps(measure(setting, args.steps)))
        return 0
    rows = []
    for setting in SETTINGS[: args.limit]:
        child = subprocess.run(
            [sys.executable, __file__, "--steps", str(args.steps), "--one", json.dumps(asdict(setting))],
            capture_output=True, text=True, check=True,
        )
        row = {"setting": setting.label(), **asdict(setting), **json.loads(child.stdout.splitlines()[-1]), **planned(setting)}
        row["error"] = row["planned_bytes"] / row["peak_bytes"] - 1
        rows.append(row)
        print(f"{row['setting']}: measured {row['peak_bytes'] / MIB:.0f} MiB, planned {row['planned_bytes'] / MIB:.0f} MiB ({row['error']:+.1%})", flush=True)
    table = Table(title="Peak memory of a training step: measured against `florist plan` (embedded model, float32 weights)")
    for column in ("setting", "weights+LoRA MiB", "peak MiB", "planned MiB", "plan - measured", "s/step"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for row in rows:
        table.add_row(
            row["setting"], f"{row['loaded_bytes'] / MIB:.0f}", f"{row['peak_bytes'] / MIB:.0f}", f"{row['planned_bytes'] / MIB:.0f}",
            f"{row['error']:+.1%}", f"{row['seconds'] / args.steps:.2f}",
        )
    make_console().print(table)
    if args.out:
        from florist.files import write_atomically

        write_atomically(args.out, json.dumps(rows, indent=2) + "\n")
    misses = [row["setting"] for row in rows if abs(row["error"]) > args.tolerance]
    if misses:
        print(f"beyond {args.tolerance:.0%}: {', '.join(misses)}")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
