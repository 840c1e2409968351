"""Device and dtype resolution: bfloat16 on a CPU without native bfloat16 instructions warns once,
says what it costs and what to use instead, and nothing picks bfloat16 by itself."""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deris_rerank import Pipeline, cli, devices
from deris_rerank.distributed import PipelineSpec
from deris_rerank.errors import SlowDtypeWarning

CPU = torch.device("cpu")
AVX2_ONLY = frozenset({"sse2", "avx", "avx2", "fma3", "f16c"})


@pytest.fixture
def cpu_with(monkeypatch):
    """Make the detection see a CPU with the given features; the once-per-process notice unsaid."""
    monkeypatch.setattr(devices, "_slow_bfloat16_announced", False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)

    def set_features(features):
        monkeypatch.setattr(devices, "cpu_features", lambda: frozenset(features))

    return set_features


def slow_dtype_warnings(record):
    return [w for w in record if issubclass(w.category, SlowDtypeWarning)]


def test_bfloat16_on_a_cpu_without_native_bfloat16_warns_once_with_cost_and_advice(cpu_with):
    cpu_with(AVX2_ONLY)
    with pytest.warns(SlowDtypeWarning) as record:
        assert devices.resolve_precision("bfloat16", CPU) == "bfloat16"  # still honoured: the user asked
    (message,) = [str(w.message) for w in slow_dtype_warnings(record)]
    assert "no native bfloat16 instructions" in message and "20-30x slower than float32" in message
    assert "use float32" in message and "AVX-512 BF16 or AMX" in message
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        devices.resolve_precision("bfloat16", CPU)
        devices.resolve_precision(torch.bfloat16, CPU)
    assert slow_dtype_warnings(again) == []


@pytest.mark.parametrize("features", [{"avx2", "avx512_f", "avx512_bf16"}, {"avx2", "amx_tile", "amx_bf16"}, {"neon", "bf16"}])
def test_no_warning_where_bfloat16_is_native(cpu_with, features):
    cpu_with(features)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowDtypeWarning)
        assert devices.resolve_precision("bfloat16", CPU) == "bfloat16"
    assert devices.bfloat16_emulation() is None


def test_no_warning_for_float32_or_on_cuda(cpu_with):
    cpu_with(AVX2_ONLY)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowDtypeWarning)
        assert devices.resolve_precision("float32", CPU) == "float32"
        assert devices.resolve_precision(None, CPU) == "float32"
        assert devices.resolve_precision("bfloat16", torch.device("cuda")) == "bfloat16"
        assert devices.resolve_precision("int8", CPU) == "int8"
        assert devices.resolve_precision("auto", CPU) == "auto"


def test_onednn_isa_limit_counts_and_aten_capability_does_not(cpu_with, monkeypatch):
    """ATEN_CPU_CAPABILITY chooses torch's own kernels; bfloat16 matmuls still run on oneDNN's
    native code then (measured), so only the hardware and oneDNN's own limit decide."""
    cpu_with({"avx2", "avx512_f", "avx512_bf16"})
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert devices.bfloat16_emulation() is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert devices.bfloat16_emulation() is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert "ONEDNN_MAX_CPU_ISA=avx2" in devices.bfloat16_emulation()


def test_undetectable_cpu_features_give_no_warning(monkeypatch):
    monkeypatch.setattr(devices, "_slow_bfloat16_announced", False)
    monkeypatch.setattr(devices, "cpu_features", lambda: None)
    assert devices.bfloat16_emulation() is None


@pytest.mark.skipif(not (sys.platform.startswith("linux") and Path("/proc/cpuinfo").is_file()), reason="needs Linux's /proc/cpuinfo")
def test_cpu_features_from_torch_and_from_proc_cpuinfo_agree_on_bfloat16(monkeypatch):
    from_torch = devices.cpu_features()
    if from_torch is None or not hasattr(torch.cpu, "get_capabilities"):
        pytest.skip("this torch has no torch.cpu.get_capabilities")
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    from_proc = devices.cpu_features()
    assert from_proc  # the flags (x86) or Features (Arm) line
    assert from_torch & devices.NATIVE_BFLOAT16_FEATURES == from_proc & devices.NATIVE_BFLOAT16_FEATURES


def dtype_defaults(parser: argparse.ArgumentParser):
    """{command: default of --dtype} of every deris-rerank command that has a --dtype."""
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: action.default for name, sub in commands.choices.items()
            for action in sub._actions if action.dest == "dtype"}


def test_nothing_picks_bfloat16_on_a_cpu_without_it(cpu_with, tiny_model_dir):
    cpu_with(AVX2_ONLY)
    defaults = dtype_defaults(cli.build_parser())
    assert {"segment", "batch", "app", "extract"} <= set(defaults)
    assert set(defaults.values()) == {"float32"}
    assert PipelineSpec().dtype is None
    assert devices.autocast_dtype_of(devices.resolve_precision(None, CPU)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowDtypeWarning)
        plain = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu")
    assert plain.precision == "float32" and plain.autocast_dtype is None


def test_cli_says_once_that_bfloat16_is_slow_here(cpu_with, tiny_model_dir, tmp_path, capsys):
    import cv2

    cpu_with(AVX2_ONLY)
    image = tmp_path / "photo.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    code = cli.main(["segment", "--image", str(image), "--text", "man on the left", "--text", "the red car",
                     "--out", str(tmp_path / "out"), "--deris", str(tiny_model_dir / "deris"), "--no-gate",
                     "--device", "cpu", "--dtype", "bfloat16"])
    assert code == 0
    slow = [line for line in capsys.readouterr().err.splitlines() if "bfloat16 is slow here" in line]
    assert len(slow) == 1 and slow[0].startswith("deris-rerank: warning:") and "use float32" in slow[0]


@pytest.mark.parametrize("dtype, device, advice", [
    ("float16", "cpu", "float16 runs as CUDA autocast; on cpu use float32, int8 or bfloat16"),
    ("int8", "cuda", "int8 runs on the CPU only; on cuda use float32, bfloat16 or float16"),
    ("int4", "cpu", "dtype must be one of float32, bfloat16, float16, int8 or auto, got int4"),
    (torch.float64, "cpu", "dtype must be one of float32, bfloat16, float16, int8 or auto, got torch.float64"),
])
def test_a_precision_that_cannot_run_there_is_one_line_naming_what_can(dtype, device, advice):
    from deris_rerank.errors import InputError

    with pytest.raises(InputError) as raised:
        devices.resolve_precision(dtype, torch.device(device))
    assert str(raised.value) == (advice if advice.startswith("dtype") else f"dtype {advice}")
