"""The user is told what the model cannot do: unknown words, truncated text, empty masks, the
embedded default's limits; and settings are checked where they are given."""
import json
import warnings

import numpy as np
import pytest

from deris_rerank import Pipeline, cli
from deris_rerank.cli.segment import summary as summary_of
from deris_rerank.errors import CheckpointError, EmbeddedDefaultWarning, InputError, UnknownWordsWarning
from deris_rerank.rerank.files import load_gate
from deris_rerank.result import Result


@pytest.fixture
def image_path(tmp_path):
    import cv2

    rng = np.random.default_rng(3)
    path = tmp_path / "photo.png"
    cv2.imwrite(str(path), rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    return path


def model_args(tiny_model_dir):
    return ["--deris", str(tiny_model_dir / "deris"), "--gate", str(tiny_model_dir / "gate.safetensors"), "--device", "cpu"]


def test_unknown_words_are_named_in_warning_result_and_json(tiny_model_dir, image_path):
    pipe = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu")
    with pytest.warns(UnknownWordsWarning, match="'jazz'"):
        result = pipe(image_path, "the jazz man on the left")
    assert result.unknown_words == ["jazz"]
    assert result.to_json()["unknown_words"] == ["jazz"]
    assert any("jazz" in note for note in result.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnknownWordsWarning)
        known = pipe(image_path, "man on the left")
    assert known.unknown_words == [] and known.to_json()["notes"] == []


def test_cli_prints_unknown_words_and_caps_a_long_text(tiny_model_dir, image_path, tmp_path, capsys):
    long_text = "man on the left " * 3125  # 50,000 characters
    code = cli.main(["segment", "--image", str(image_path), "--text", long_text, "--out", str(tmp_path / "out"),
                     *model_args(tiny_model_dir)])
    captured = capsys.readouterr()
    assert code == 0
    assert len(captured.out) < 2000 and len(captured.err) < 2000, "the text must not be echoed whole"
    assert "50000 characters" in captured.out and "truncated to its first" in captured.out
    saved = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert saved["text"] == long_text and saved["truncated_to_tokens"] > 0

    code = cli.main(["segment", "--image", str(image_path), "--text", "the jazz quiz", "--out", str(tmp_path / "o2"),
                     *model_args(tiny_model_dir)])
    captured = capsys.readouterr()
    assert code == 0
    warning = [line for line in captured.err.splitlines() if line.startswith("deris-rerank: warning:")]
    assert len(warning) == 1 and "'jazz'" in warning[0] and "'quiz'" in warning[0]
    assert "note: words unknown to the model" in captured.out


def test_empty_mask_is_said_in_summary_and_json():
    empty = np.zeros((5, 6), bool)
    result = Result(text="the cat", mask=empty, selected_rank=0, switched=False, p_fail=None, scores=[0.4, 0.2],
                    slots=[1, 0], deris_mask=empty, default_mask=empty, existence=0.1, timings={"deris": 1.0})
    assert result.mask_empty and result.to_json()["mask_empty"] is True
    assert result.notes[0].startswith("the chosen mask is empty")
    summary = summary_of(result, {})
    assert "mask: EMPTY" in summary and "note: the chosen mask is empty" in summary
    full = Result(**{**result.__dict__, "mask": np.ones((5, 6), bool)})
    assert not full.mask_empty and "mask: 30 pixels" in summary_of(full, {})


@pytest.mark.parametrize("tau", [-0.1, 1.5, float("nan")])
def test_tau_outside_zero_one_is_refused(tiny_model_dir, image_path, tmp_path, capsys, tau):
    with pytest.raises(InputError, match="tau must be between 0 and 1"):
        Pipeline(deris=tiny_model_dir / "deris", device="cpu", tau=tau)
    with pytest.raises(InputError, match="tau must be between 0 and 1"):
        load_gate(tiny_model_dir / "gate.safetensors", tau=tau)
    code = cli.main(["segment", "--image", str(image_path), "--text", "x", "--out", str(tmp_path),
                     *model_args(tiny_model_dir), "--tau", str(tau)])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("deris-rerank: error:")]
    assert code == 2 and len(errors) == 1 and "tau" in errors[0]


@pytest.mark.parametrize("argument, needle", [({"query_source": "bogus"}, "query_source"),
                                              ({"batch_semantics": "bogus"}, "batch_semantics")])
def test_bad_pipeline_arguments_fail_at_construction(tiny_model_dir, argument, needle):
    with pytest.raises(InputError, match=needle):
        Pipeline(deris=tiny_model_dir / "deris", device="cpu", **argument)


def test_unknown_config_field_is_a_clear_error(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir / "deris", folder)
    sidecar = json.loads((folder / "config.json").read_text())
    sidecar["config"]["fancy_new_option"] = True
    (folder / "config.json").write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="unknown field.*'fancy_new_option'") as error:
        Pipeline(deris=folder, device="cpu")
    assert str(folder / "config.json") in str(error.value)


def test_the_embedded_default_says_what_it_knows_once(monkeypatch):
    from deris_rerank import pipeline

    if not (pipeline.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip(f"embedded default model not found in {pipeline.DEFAULT_MODEL}")
    monkeypatch.setattr(pipeline, "_embedded_default_announced", False)
    with pytest.warns(EmbeddedDefaultWarning, match="RefShapes") as record:
        pipe = Pipeline(device="cpu")
        Pipeline(device="cpu")
    assert sum(issubclass(w.category, EmbeddedDefaultWarning) for w in record) == 1
    with pytest.warns(UnknownWordsWarning, match="'cat'"):
        cat = pipe(np.zeros((64, 64, 3), np.uint8), "the cat")
    assert cat.embedded_default and any("RefShapes" in note for note in cat.notes)


def test_extracting_refshapes_with_the_embedded_default_does_not_warn(monkeypatch, tmp_path, capsys):
    from deris_rerank import cli, pipeline

    if not (pipeline.DEFAULT_MODEL / "model.safetensors").is_file():
        pytest.skip(f"embedded default model not found in {pipeline.DEFAULT_MODEL}")
    monkeypatch.setattr(pipeline, "_embedded_default_announced", False)
    code = cli.main(["extract", "--data", "refshapes", "--split", "x", "--refshapes-images", "1", "--refshapes-size", "128",
                     "--out", str(tmp_path), "--device", "cpu", "--quiet"])
    assert code == 0 and "embedded default" not in capsys.readouterr().err
