"""`deris-rerank segment` / demo/segment.py and `deris-rerank batch` on a test-sized model.

Each test writes what it needs (images, manifests, outputs) under its own tmp_path.
"""
import json
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from deris_rerank import cli
from deris_rerank.rle import decode_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def images(tmp_path):
    """This test's own folder of three small images, img0.png (120x160), img1.png (90x90), img2.png (150x100)."""
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(5)
    for k, (h, w) in enumerate([(120, 160), (90, 90), (150, 100)]):
        cv2.imwrite(str(root / f"img{k}.png"), cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (7, 7), 2))
    return root


def model_args(tiny_model_dir):
    return ["--deris", str(tiny_model_dir / "deris"), "--gate", str(tiny_model_dir / "gate.safetensors"), "--device", "cpu"]


def test_segment_writes_overlay_mask_and_summary(tiny_model_dir, images, tmp_path, capsys):
    code = cli.main(["segment", "--image", str(images / "img0.png"), "--text", "man on the left", "--out", str(tmp_path),
                     "--candidates", *model_args(tiny_model_dir)])
    out = capsys.readouterr().out
    assert code == 0
    assert "p_fail" in out and "scores:" in out and "time:" in out
    assert "tau 0.3" in out  # the threshold the decision was made against (the test gate's)
    mask = cv2.imread(str(tmp_path / "img0_mask.png"), cv2.IMREAD_GRAYSCALE)
    saved = json.loads((tmp_path / "img0.json").read_text())
    assert mask.shape == (120, 160) and np.array_equal(mask > 127, decode_mask(saved["mask"]))
    assert cv2.imread(str(tmp_path / "img0_overlay.png")).shape == (120, 160, 3)
    assert (tmp_path / "img0_candidates.png").is_file()


def test_segment_json_output(tiny_model_dir, images, tmp_path, capsys):
    code = cli.main(["segment", "--image", str(images / "img1.png"), "--text", "the red car", "--out", str(tmp_path),
                     "--json", "--no-gate", *model_args(tiny_model_dir)[:2], "--device", "cpu"])
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["selected"] == 0 and data["p_fail"] is None and data["image_size"] == [90, 90]


def test_demo_script_user_mistakes_are_one_line(tiny_model_dir, images, tmp_path):
    def demo(*args):
        return subprocess.run([sys.executable, str(REPO / "demo" / "segment.py"), *args], capture_output=True, text=True)

    cases = [
        (["--image", str(tmp_path / "nope.jpg"), "--text", "x", *model_args(tiny_model_dir)], "nope.jpg"),
        (["--image", str(images / "img0.png"), "--text", " ", *model_args(tiny_model_dir)], "empty"),
        (["--image", str(images / "img0.png"), "--text", "x", "--deris", str(tmp_path / "none.pth")], "none.pth"),
        (["--image", str(images / "img0.png"), "--text", "x", "--out", "/proc/forbidden", *model_args(tiny_model_dir)], "/proc/forbidden"),
    ]
    for args, needle in cases:
        result = demo(*args)
        assert result.returncode == 2, result.stderr
        errors = [line for line in result.stderr.splitlines() if line.startswith("deris-rerank: error:")]
        assert len(errors) == 1 and needle in errors[0] and "Traceback" not in result.stderr


def write_manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_batch_manifest_records_bad_items_and_goes_on(tiny_model_dir, images, tmp_path, capsys):
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    manifest = write_manifest(images / "pairs.jsonl", [
        {"image": "img0.png", "text": "man on the left", "id": "first"},
        {"image": "broken.jpg", "text": "the red car", "id": "bad image"},
        {"image": "img1.png", "text": "", "id": "empty"},
        {"image": "img2.png", "text": "top right square", "id": "../../escape"},
        {"image": "img0.png", "text": "the red car", "id": "first"},
    ])
    code = cli.main(["batch", "--manifest", str(manifest), "--out", str(tmp_path / "out"), "--quiet", *model_args(tiny_model_dir)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and summary["failed"] == 2 and summary["succeeded"] == 3 and summary["total"] == 5
    results = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    errors = [json.loads(line) for line in (tmp_path / "out" / "errors.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == ["first", "_.._escape", "first-2"]  # manifest order, sanitised, unique
    assert {e["id"] for e in errors} == {"bad_image", "empty"}
    assert any("broken.jpg" in e["error"] for e in errors)
    masks = sorted(p.name for p in (tmp_path / "out" / "masks").iterdir())
    assert masks == ["_.._escape.png", "first-2.png", "first.png"]
    mask = cv2.imread(str(tmp_path / "out" / "masks" / "first.png"), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(mask > 127, decode_mask(results[0]["mask"]))
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"] == 2


def test_batch_folder_with_texts_file_and_csv(tiny_model_dir, images, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("man on the left\n\nthe red car\n")

    def folder_batch(out):
        code = cli.main(["batch", "--images", str(images), "--texts-file", str(texts), "--out", str(tmp_path / out),
                         "--quiet", "--batch-size", "4", *model_args(tiny_model_dir)])
        return code, json.loads(capsys.readouterr().out)

    code, summary = folder_batch("a")  # 3 good images x 2 texts (the blank line is no text)
    assert code == 0 and (summary["total"], summary["succeeded"], summary["failed"]) == (6, 6, 0)
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    code, summary = folder_batch("b")  # the same and a broken image: its 2 pairs fail, the exit code says so
    assert code == 1 and (summary["total"], summary["succeeded"], summary["failed"]) == (8, 6, 2)
    errors = [json.loads(line) for line in (tmp_path / "b" / "errors.jsonl").read_text().splitlines()]
    assert len(errors) == 2 and all("broken.jpg" in e["error"] for e in errors)

    csv_manifest = images / "pairs.csv"
    csv_manifest.write_text("image,text\nimg0.png,man on the left\nimg1.png,\"the red car, small\"\n")
    assert cli.main(["batch", "--manifest", str(csv_manifest), "--out", str(tmp_path / "c"), "--quiet", *model_args(tiny_model_dir)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "c" / "results.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["man on the left", "the red car, small"]


def comparable(folder):
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("timings_ms")
    masks = {p.name: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).tobytes() for p in (folder / "masks").iterdir()}
    return rows, masks, (folder / "errors.jsonl").read_text()


# Runs `deris-rerank batch` (argv[2:]) and kills itself with SIGKILL once run_batch has taken
# argv[1] outcomes from the pipeline, i.e. when exactly that many pairs are written and the next
# is about to be: a kill part-way at a known point, however fast the machine. Test-only: it wraps
# Pipeline.iter_batch in this process alone.
KILL_AFTER = """
import os, signal, sys
from deris_rerank import cli
from deris_rerank.pipeline import Pipeline

after = int(sys.argv[1])
original = Pipeline.iter_batch

def iter_batch(self, *args, **kwargs):
    for n, outcome in enumerate(original(self, *args, **kwargs)):
        if n == after:
            os.kill(os.getpid(), signal.SIGKILL)
        yield outcome

Pipeline.iter_batch = iter_batch
sys.exit(cli.main(sys.argv[2:]))
"""


def test_batch_killed_part_way_resumes_to_the_same_files(tiny_model_dir, images, tmp_path, capsys):
    rows = [{"image": f"img{k % 3}.png", "text": t, "id": f"p{k}"} for k, t in
            enumerate(["man on the left", "the red car", "top right square", "the biggest circle"] * 4)]
    manifest = write_manifest(tmp_path / "pairs.jsonl", [dict(r, image=str(images / r["image"])) for r in rows])
    # batch size 1: float32 results are bit-identical only for the same batch composition (with
    # several threads, a matmul's summation order depends on its shape), and the resumed run
    # batches the remaining pairs differently
    arguments = ["batch", "--manifest", str(manifest), "--quiet", "--batch-size", "1", *model_args(tiny_model_dir)]
    assert cli.main(arguments + ["--out", str(tmp_path / "full")]) == 0
    capsys.readouterr()

    partial, written = tmp_path / "partial", 5  # killed part-way, after 5 of 16 pairs
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER, str(written), *arguments, "--out", str(partial)],
                            cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    finished = [json.loads(line) for line in (partial / "results.jsonl").read_text().splitlines()]
    assert len(finished) == written and len({r["id"] for r in finished}) == written
    assert sorted(p.name for p in (partial / "masks").iterdir()) == sorted(f"{r['id']}.png" for r in finished)
    assert not (partial / "summary.json").exists()
    with open(partial / "results.jsonl", "a") as handle:  # as if a kill had torn the last line
        handle.write('{"id": "p15", "image": ')

    assert cli.main(arguments + ["--out", str(partial)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["skipped_already_done"] == written and summary["processed_this_run"] == len(rows) - written
    assert comparable(partial) == comparable(tmp_path / "full")  # nothing lost, duplicated or out of order
    assert len(comparable(partial)[0]) == len(rows) and len(comparable(partial)[1]) == len(rows)
    assert not [p for p in partial.rglob("*") if p.name.endswith(".tmp")]
