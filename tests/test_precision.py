"""Training precision by hardware: the decision from CPU flag sets such machines report, and its record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from florist.models import BF16_CPU_FLAGS, choose_precision, cpu_flags, hardware_precision

AVX2_EPYC = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2"
"""This project's usual 2-core AMD EPYC: AVX2, no native bf16."""
ZEN4 = AVX2_EPYC + " avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni"
SAPPHIRE_RAPIDS = AVX2_EPYC + " avx512f avx512_fp16 amx_bf16 amx_tile amx_int8"
ICE_LAKE = AVX2_EPYC + " avx512f avx512dq avx512bw avx512vl avx512_vnni"
"""AVX-512 without its bf16 extension: bf16 would still be emulated."""


@pytest.mark.parametrize(
    ("flags", "dtype"),
    [(AVX2_EPYC, "fp32"), (ICE_LAKE, "fp32"), (ZEN4, "bf16"), (SAPPHIRE_RAPIDS, "bf16"), ("", "fp32")],
    ids=["avx2", "avx512-without-bf16", "avx512_bf16", "amx_bf16", "no-flags"],
)
def test_auto_uses_bf16_on_a_cpu_exactly_when_it_has_native_bf16(flags, dtype):
    precision = choose_precision("auto", "cpu", flags.split())
    assert precision.dtype == dtype and precision.autocast == (dtype == "bf16")
    named = [flag for flag in BF16_CPU_FLAGS if flag in flags.split()]
    # The reason names the flag that decided it, or the flags that were missing.
    assert all(flag in precision.reason for flag in (named or BF16_CPU_FLAGS))


@pytest.mark.parametrize(("gpu_bf16", "dtype"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_gpu_follows_its_bf16_support_not_the_cpu(gpu_bf16, dtype):
    assert choose_precision("auto", "cuda", AVX2_EPYC.split(), gpu_bf16=gpu_bf16).dtype == dtype


@pytest.mark.parametrize("flags", [AVX2_EPYC, ZEN4])
def test_an_explicit_setting_wins_over_the_hardware(flags):
    assert choose_precision("none", "cpu", flags.split()).dtype == "fp32"
    assert choose_precision("none", "cuda", flags.split()).dtype == "fp32"
    assert choose_precision("bf16", "cpu", flags.split()).dtype == "bf16"


def test_an_unknown_setting_is_a_one_line_error():
    with pytest.raises(ValueError, match="model.autocast 'fp8' is unknown") as caught:
        choose_precision("fp8", "cpu", [])
    assert "\n" not in str(caught.value)


def test_cpu_flags_come_from_the_flags_line(tmp_path: Path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: {ZEN4}\n\nprocessor\t: 1\nflags\t\t: {ZEN4}\n")
    assert cpu_flags(cpuinfo) == frozenset(ZEN4.split())
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_gets_what_its_flags_say():
    precision = hardware_precision("auto", torch.device("cpu"))
    native = bool(set(BF16_CPU_FLAGS) & cpu_flags())
    assert precision.autocast == native
    json.dumps(precision.as_record())  # what summary.json holds under "precision"
    assert set(precision.as_record()) == {"dtype", "setting", "device", "reason"}
