"""`deris-rerank segment` / demo/segment.py and `deris-rerank batch` on a test-sized model."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from deris_rerank import cli
from deris_rerank.rle import decode_mask

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
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
    code = cli.main(["batch", "--images", str(images), "--texts-file", str(texts), "--out", str(tmp_path / "a"),
                     "--quiet", "--batch-size", "4", *model_args(tiny_model_dir)])
    summary = json.loads(capsys.readouterr().out)
    # broken.jpg (left by the previous test or not) fails; the 3 good images x 2 texts succeed
    assert summary["succeeded"] == 6 and code == (1 if summary["failed"] else 0)
    csv_manifest = images / "pairs.csv"
    csv_manifest.write_text("image,text\nimg0.png,man on the left\nimg1.png,\"the red car, small\"\n")
    assert cli.main(["batch", "--manifest", str(csv_manifest), "--out", str(tmp_path / "b"), "--quiet", *model_args(tiny_model_dir)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "b" / "results.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["man on the left", "the red car, small"]


def comparable(folder):
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("timings_ms")
    masks = {p.name: cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).tobytes() for p in (folder / "masks").iterdir()}
    return rows, masks, (folder / "errors.jsonl").read_text()


def test_batch_killed_part_way_resumes_to_the_same_files(tiny_model_dir, images, tmp_path):
    rows = [{"image": f"img{k % 3}.png", "text": t, "id": f"p{k}"} for k, t in
            enumerate(["man on the left", "the red car", "top right square", "the biggest circle"] * 4)]
    manifest = write_manifest(tmp_path / "pairs.jsonl", [dict(r, image=str(images / r["image"])) for r in rows])
    command = [sys.executable, "-m", "deris_rerank", "batch", "--manifest", str(manifest), "--quiet",
               "--batch-size", "1", *model_args(tiny_model_dir)]
    assert subprocess.run(command + ["--out", str(tmp_path / "full")], capture_output=True).returncode == 0

    partial = tmp_path / "partial"
    process = subprocess.Popen(command + ["--out", str(partial)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    results = partial / "results.jsonl"
    while time.time() < deadline and (not results.exists() or results.read_text().count("\n") < 3):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    finished_before_kill = results.read_text().count("\n")
    assert 3 <= finished_before_kill < 16, "the run must be killed part-way"

    rerun = subprocess.run(command + ["--out", str(partial)], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["skipped_already_done"] >= finished_before_kill
    assert comparable(partial) == comparable(tmp_path / "full")
    assert not [p for p in partial.rglob("*") if p.name.endswith(".tmp")]
