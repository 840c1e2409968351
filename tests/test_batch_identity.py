"""`deris-rerank batch` resumes only work done with the same settings and for the same inputs."""
import json
from pathlib import Path

import warnings

import cv2
import numpy as np
import pytest
import torch

from deris_rerank import cli


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(11)
    for k, (h, w) in enumerate([(64, 80), (72, 72)]):
        cv2.imwrite(str(root / f"img{k}.png"), cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 2))
    return root


def run(tiny_model_dir, out, *args, gate=True):
    model = ["--deris", str(tiny_model_dir / "deris"), "--device", "cpu"]
    model += ["--gate", str(tiny_model_dir / "gate.safetensors")] if gate else ["--no-gate"]
    return cli.main(["batch", "--out", str(out), "--quiet", *model, *args])


def snapshot(folder: Path) -> dict:
    """Every file under `folder` by relative path -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def error_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("deris-rerank: error:")]


def test_same_settings_resume_and_identity_is_recorded(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "man on the left") == 0
    first = json.loads(capsys.readouterr().out)
    identity = json.loads((out / "run.json").read_text())
    assert identity["gate"]["rule"]["tau"] == pytest.approx(0.3) and identity["dtype"] == "float32"
    assert len(identity["model"]["sha256"]) == 64 and len(identity["tokenizer_sha256"]) == 64
    assert first["run"]["gate"] == identity["gate"] and first["processed_this_run"] == 2
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "man on the left") == 0
    again = json.loads(capsys.readouterr().out)
    assert again["skipped_already_done"] == 2 and again["processed_this_run"] == 0


@pytest.mark.parametrize("first, change, needle", [
    ([], ["--tau", "0.9"], "tau 0.3 -> 0.9"),
    ([], ["--batch-size", "1"], "batch_size 8 -> 1"),  # float32 sums depend on the batch: results would differ
    (["--threads", "2"], ["--threads", "1"], "threads 2 -> 1"),  # ... and on torch's thread count
])
def test_other_settings_stop_before_touching_anything(tiny_model_dir, images, tmp_path, capsys, first, change, needle):
    out = tmp_path / "out"
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "man on the left", *first) == 0
    before = snapshot(out)
    capsys.readouterr()
    code = run(tiny_model_dir, out, "--images", str(images), "--text", "man on the left", *change)
    errors = error_lines(capsys)
    assert code == 2 and len(errors) == 1
    assert needle in errors[0] and "--overwrite" in errors[0] and str(out) in errors[0]
    assert snapshot(out) == before


def test_a_removed_gate_is_one_line_with_its_hash(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "man on the left") == 0
    sha256 = json.loads((out / "run.json").read_text())["gate"]["sha256"]
    capsys.readouterr()
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "man on the left", gate=False) == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and f"(gate {sha256[:8]}... -> none)" in errors[0]  # and no line per rule setting
    assert run(tiny_model_dir, tmp_path / "plain", "--images", str(images), "--text", "man on the left", gate=False) == 0
    capsys.readouterr()
    assert run(tiny_model_dir, tmp_path / "plain", "--images", str(images), "--text", "man on the left") == 2
    assert f"(gate none -> {sha256[:8]}...)" in error_lines(capsys)[0]


def test_batch_size_and_threads_are_recorded_and_threads_restored(tiny_model_dir, images, tmp_path, capsys):
    threads = torch.get_num_threads()
    assert run(tiny_model_dir, tmp_path / "out", "--images", str(images), "--text", "the red car", "--batch-size", "3",
               "--threads", "1") == 0
    identity = json.loads((tmp_path / "out" / "run.json").read_text())
    assert identity["batch_size"] == 3 and identity["threads"] == 1
    assert torch.get_num_threads() == threads
    assert run(tiny_model_dir, tmp_path / "again", "--images", str(images), "--text", "the red car") == 0
    assert json.loads((tmp_path / "again" / "run.json").read_text())["threads"] == threads  # torch's own count
    capsys.readouterr()
    for bad, needle in ((["--threads", "0"], "--threads must be at least 1"),
                        (["--threads", "1", "--engine", "ray"], "--threads is for the local engine")):
        assert run(tiny_model_dir, tmp_path / "bad", "--images", str(images), "--text", "the red car", *bad) == 2
        errors = error_lines(capsys)
        assert len(errors) == 1 and needle in errors[0]
    assert not (tmp_path / "bad").exists()


def test_extract_records_batch_size_and_threads(tiny_model_dir, tmp_path, capsys):
    from deris_rerank.rerank.cache import read_cache

    def extract(*extra):
        return cli.main(["extract", "--data", "refshapes", "--split", "val", "--refshapes-images", "2",
                         "--refshapes-size", "64", "--out", str(tmp_path), "--quiet", "--deris",
                         str(tiny_model_dir / "deris"), "--device", "cpu", *extra])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random test model does not know RefShapes' words
        assert extract("--batch-size", "4", "--threads", "1") == 0
        _, _, provenance = read_cache([tmp_path / "val"])
        assert (provenance[0]["batch_size"], provenance[0]["threads"]) == (4, 1)
        capsys.readouterr()
        assert extract("--batch-size", "2", "--threads", "1") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "batch_size 4 -> 2" in errors[0]


def test_the_recorded_image_is_absolute_in_folder_and_manifest_mode(tiny_model_dir, images, tmp_path, monkeypatch):
    monkeypatch.chdir(images.parent)
    assert run(tiny_model_dir, tmp_path / "folder", "--images", images.name, "--text", "the red car") == 0
    (images / "pairs.jsonl").write_text(json.dumps({"image": "../images/./img0.png", "text": "the red car"}) + "\n")
    assert run(tiny_model_dir, tmp_path / "manifest", "--manifest", str(images / "pairs.jsonl")) == 0
    (folder, _), (manifest,) = ([json.loads(line) for line in (tmp_path / name / "results.jsonl").read_text().splitlines()]
                                for name in ("folder", "manifest"))
    assert folder["image"] == manifest["image"] == str(images / "img0.png")


def test_other_text_for_the_same_ids_stops(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "the red car") == 0
    before = snapshot(out)
    capsys.readouterr()
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "the biggest circle") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "'the red car' -> 'the biggest circle'" in errors[0] and "--overwrite" in errors[0]
    assert snapshot(out) == before


def test_overwrite_starts_afresh(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    texts = tmp_path / "texts.txt"
    texts.write_text("man on the left\nthe red car\n")
    assert run(tiny_model_dir, out, "--images", str(images), "--texts-file", str(texts)) == 0
    old_masks = {p.name for p in (out / "masks").iterdir()}
    capsys.readouterr()
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "the red car", "--overwrite", "--tau", "0.9") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["processed_this_run"] == 2 and summary["skipped_already_done"] == 0
    assert summary["run"]["gate"]["rule"]["tau"] == pytest.approx(0.9)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["img0", "img1"] and {r["text"] for r in rows} == {"the red car"}
    assert {p.name for p in (out / "masks").iterdir()} == {"img0.png", "img1.png"}
    assert len(old_masks) == 4 and not old_masks & {"img0.png", "img1.png"}
    assert json.loads((out / "run.json").read_text())["gate"]["rule"]["tau"] == pytest.approx(0.9)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_ids_name_the_text_when_several_texts_share_an_image(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    texts = tmp_path / "texts.txt"
    texts.write_text("man on the left\nthe red car\n")
    assert run(tiny_model_dir, out, "--images", str(images), "--texts-file", str(texts)) == 0
    ids = [json.loads(line)["id"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(set(ids)) == 4
    assert ids[0].startswith("img0_man-on-the-left_") and ids[1].startswith("img0_the-red-car_")
    # the same texts in another order give each pair the same id: the rerun has nothing to do
    texts.write_text("the red car\nman on the left\n")
    capsys.readouterr()
    assert run(tiny_model_dir, out, "--images", str(images), "--texts-file", str(texts)) == 0
    assert json.loads(capsys.readouterr().out)["skipped_already_done"] == 4


def test_results_without_a_recorded_identity_are_not_resumed(tiny_model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "the red car") == 0
    (out / "run.json").unlink()  # as written by a version that did not record it
    capsys.readouterr()
    assert run(tiny_model_dir, out, "--images", str(images), "--text", "the red car") == 2
    errors = error_lines(capsys)
    assert len(errors) == 1 and "run.json" in errors[0] and "--overwrite" in errors[0]


def test_failed_pairs_are_counted_on_stderr(tiny_model_dir, images, tmp_path, capsys):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"image": str(images / "img0.png"), "text": "man on the left", "id": "good"},
        {"image": str(images / "broken.jpg"), "text": "the red car", "id": "bad"},
        {"image": str(images / "img1.png"), "text": "  ", "id": "blank"},
    ]))
    assert run(tiny_model_dir, tmp_path / "out", "--manifest", str(manifest)) == 1
    err = capsys.readouterr().err
    assert "2 of 3 pairs failed" in err and "errors.jsonl" in err
    assert "bad: " in err and "broken.jpg" in err and "blank: " in err and "empty" in err
