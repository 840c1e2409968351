"""dtype="auto" and `deris-rerank doctor`: the fastest measured mode, never a slower one, never an
emulated bfloat16; the measurement remembered per machine and model; a recommendation to act on."""
import pytest
import torch
from torch import nn

from conftest import build_tiny_model
from deris_rerank import Pipeline, cli, precision_choice
from deris_rerank.cli import doctor

CPU = torch.device("cpu")
DYNAMIC_LINEAR = torch.ao.nn.quantized.dynamic.Linear


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """Replace the timing by given ms per mode (counting the measurements); the cache in tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []

    def set_times(times):
        def fake(model, device, modes, repeats=2):
            calls.append(list(modes))
            return {mode: times[mode] for mode in modes}

        monkeypatch.setattr(precision_choice, "time_modes", fake)
        return calls

    return set_times


@pytest.mark.parametrize("times, chosen", [
    ({"float32": 100.0, "int8": 60.0}, "int8"),
    ({"float32": 100.0, "int8": 95.0}, "float32"),  # within MIN_GAIN: not worth different numbers
    ({"float32": 100.0, "int8": 130.0}, "float32"),  # slower: never chosen
    ({"float32": 100.0, "int8": 70.0, "bfloat16": 50.0}, "bfloat16"),
])
def test_auto_chooses_the_fastest_mode_only_when_clearly_faster(times, chosen):
    assert precision_choice.fastest(times) == chosen


def test_emulated_bfloat16_and_missing_int8_kernels_are_never_candidates(monkeypatch):
    monkeypatch.setattr(precision_choice, "bfloat16_emulation", lambda: "no native bfloat16")
    monkeypatch.setattr(precision_choice, "available_engines", lambda: ["x86", "onednn"])
    assert precision_choice.candidate_modes(CPU) == ["float32", "int8"]
    monkeypatch.setattr(precision_choice, "bfloat16_emulation", lambda: None)
    monkeypatch.setattr(precision_choice, "available_engines", lambda: ["qnnpack"])
    assert precision_choice.candidate_modes(CPU) == ["float32", "bfloat16"]
    assert precision_choice.candidate_modes(torch.device("cuda")) == ["float32"]


def test_a_choice_is_measured_once_and_remembered_per_thread_count(measured, monkeypatch):
    monkeypatch.setattr(precision_choice, "candidate_modes", lambda device: ["float32", "int8"])
    calls = measured({"float32": 100.0, "int8": 50.0})
    model = build_tiny_model()
    assert precision_choice.choose_precision(model, CPU) == ("int8", {"float32": 100.0, "int8": 50.0})
    assert precision_choice.choose_precision(model, CPU)[0] == "int8"
    assert len(calls) == 1
    assert precision_choice.choose_precision(model, CPU, reuse=False)[0] == "int8"
    assert len(calls) == 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        precision_choice.choose_precision(model, CPU)
    finally:
        torch.set_num_threads(threads)
    assert len(calls) == 3


def test_an_unreadable_remembered_choice_is_measured_again(measured, monkeypatch):
    monkeypatch.setattr(precision_choice, "candidate_modes", lambda device: ["float32", "int8"])
    calls = measured({"float32": 100.0, "int8": 120.0})
    path = precision_choice.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert precision_choice.choose_precision(build_tiny_model(), CPU)[0] == "float32"
    assert len(calls) == 1 and path.read_text().startswith("{")


@pytest.mark.parametrize("times, mode", [({"float32": 100.0, "int8": 50.0}, "int8"), ({"float32": 100.0, "int8": 150.0}, "float32")])
def test_pipeline_auto_runs_the_chosen_mode(measured, monkeypatch, tiny_model_dir, times, mode):
    monkeypatch.setattr(precision_choice, "candidate_modes", lambda device: ["float32", "int8"])
    measured(times)
    pipe = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu", dtype="auto")
    assert pipe.precision == mode and pipe.precision_times == times
    assert any(isinstance(m, DYNAMIC_LINEAR) for m in pipe.model.modules()) == (mode == "int8")


def test_the_real_measurement_times_every_candidate_and_leaves_the_model_float32():
    model = build_tiny_model()
    times = precision_choice.time_modes(model, CPU, ["float32", "int8"], repeats=1)
    assert set(times) == {"float32", "int8"} and all(ms > 0 for ms in times.values())
    assert not any(isinstance(m, DYNAMIC_LINEAR) for m in model.modules())
    assert any(type(m) is nn.Linear for m in model.modules())


def test_doctor_prints_the_machine_and_one_recommendation(measured, monkeypatch, tiny_model_dir, capsys):
    monkeypatch.setattr(precision_choice, "candidate_modes", lambda device: ["float32", "int8"])
    measured({"float32": 100.0, "int8": 50.0})
    assert cli.main(["doctor", "--deris", str(tiny_model_dir / "deris")]) == 0
    out = capsys.readouterr().out
    assert "AVX2 " in out and "int8:" in out and "bfloat16:" in out
    (line,) = [line for line in out.splitlines() if line.startswith("recommendation:")]
    assert line.startswith("recommendation: --dtype int8 (2.00x float32's speed here")
    assert doctor.recommendation({"float32": 100.0, "int8": 130.0}, "float32").startswith("--dtype float32 (the default)")
