"""Text that is not valid Unicode and values of the wrong type, at every entry point: one line
naming the input (InputError; exit 2 for the CLI), and in batch mode and extract that pair's
record while the rest go on."""
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from deris_rerank import Pipeline, cli
from deris_rerank.batch import read_manifest
from deris_rerank.data import RefShapes
from deris_rerank.data.refcoco import write_seqtr
from deris_rerank.errors import InputError
from deris_rerank.training.tokenizer import train_word_tokenizer

REPO = Path(__file__).resolve().parents[1]
BAD_TEXT = "the \udcff cross"  # what Python makes of the bytes b"the \xff cross" (argv, file names)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu")


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(7)
    for k in range(2):
        cv2.imwrite(str(root / f"img{k}.png"), rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return root


def model_args(tiny_model_dir):
    return ["--deris", str(tiny_model_dir / "deris"), "--gate", str(tiny_model_dir / "gate.safetensors"), "--device", "cpu"]


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("deris-rerank: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_text_that_is_not_unicode_is_an_input_error_naming_it(pipe, images):
    for call in (lambda: pipe(images / "img0.png", BAD_TEXT), lambda: pipe.tokenizer.encode(BAD_TEXT, 20),
                 lambda: pipe.tokenizer.describe(BAD_TEXT, 20)):
        with pytest.raises(InputError, match="not valid Unicode") as excinfo:
            call()
        assert "'the \\udcff cross'" in str(excinfo.value) and "\n" not in str(excinfo.value)
    outcomes = dict(pipe.iter_batch([(images / "img0.png", BAD_TEXT), (images / "img0.png", "the red car")]))
    assert isinstance(outcomes[0], InputError) and outcomes[1].mask.shape == (40, 56)


def test_segment_with_an_argument_that_is_not_utf8_exits_2(tiny_model_dir, images, tmp_path, capsys):
    code = cli.main(["segment", "--image", str(images / "img0.png"), "--text", "the \udcff\udcfe cross",
                     "--out", str(tmp_path), *model_args(tiny_model_dir)])
    assert code == 2 and "not valid Unicode" in one_error_line(capsys)


def test_segment_prints_an_image_name_that_is_not_utf8(tiny_model_dir, images, tmp_path):
    """A file name with the byte 0xff, output to a strict UTF-8 stdout: printed escaped, no crash."""
    image = os.fsencode(tmp_path) + b"/\xff.png"
    Path(os.fsdecode(image)).write_bytes((images / "img0.png").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8:strict"}
    done = subprocess.run([sys.executable, "-m", "deris_rerank", "segment", "--image", image, "--text", "the red car",
                           *model_args(tiny_model_dir)], env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"\\udcff_mask.png" in done.stdout and (tmp_path / os.fsdecode(b"\xff_mask.png")).is_file()


def test_batch_records_a_pair_with_such_text_and_runs_the_rest(tiny_model_dir, images, tmp_path, capsys):
    manifest = images / "pairs.jsonl"
    rows = [{"image": "img0.png", "text": "the red car", "id": "a"}, {"image": "img1.png", "text": BAD_TEXT, "id": "b"},
            {"image": "img1.png", "text": "man on the left", "id": "c"}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))  # valid JSON: "the \udcff cross"
    out = tmp_path / "out"
    code = cli.main(["batch", "--manifest", str(manifest), "--out", str(out), "--quiet", *model_args(tiny_model_dir)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and (summary["succeeded"], summary["failed"]) == (2, 1)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == ["b"] and "not valid Unicode" in errors[0]["error"]
    assert errors[0]["text"] == BAD_TEXT and (out / "summary.json").is_file()

    # a folder with several texts (each id names its text), one of them from an argument that is not UTF-8
    texts = tmp_path / "texts.txt"
    texts.write_text("the red car\n")
    code = cli.main(["batch", "--images", str(images), "--text", BAD_TEXT, "--texts-file", str(texts),
                     "--out", str(tmp_path / "folder"), "--quiet", *model_args(tiny_model_dir)])
    summary = json.loads(capsys.readouterr().out)
    assert code == 1 and (summary["succeeded"], summary["failed"]) == (2, 2)


def test_a_texts_file_or_manifest_that_is_not_utf8_names_the_file_and_line(tiny_model_dir, images, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_bytes(b"the red car\nthe \xff cross\n")
    code = cli.main(["batch", "--images", str(images), "--texts-file", str(texts), "--out", str(tmp_path / "out"),
                     "--quiet", *model_args(tiny_model_dir)])
    line = one_error_line(capsys)
    assert code == 2 and str(texts) in line and "line 2" in line and "0xff" in line and "UTF-8" in line
    code = cli.main(["batch", "--images", str(images), "--texts-file", str(tmp_path / "none.txt"), "--out",
                     str(tmp_path / "out"), "--quiet", *model_args(tiny_model_dir)])
    assert code == 2 and "none.txt" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()

    manifest = images / "pairs.jsonl"
    manifest.write_bytes(b'{"image": "img0.png", "text": "a"}\n{"image": "img1.png", "text": "caf\xe9"}\n')
    with pytest.raises(InputError, match="line 2: byte 0xe9 is not UTF-8"):
        read_manifest(manifest)
    manifest.write_bytes(b'\xef\xbb\xbf{"image": "img0.png", "text": "caf\xc3\xa9"}\n')  # a byte-order mark is fine
    assert [item.text for item in read_manifest(manifest)] == ["café"]


@pytest.mark.parametrize("text, shown", [(None, "null"), (12, "12"), (["a"], '["a"]')])
def test_a_manifest_text_that_is_not_a_string_is_refused_not_converted(images, text, shown):
    manifest = images / "pairs.jsonl"
    manifest.write_text(json.dumps({"image": "img0.png", "text": "the red car"}) + "\n"
                        + json.dumps({"image": "img1.png", "text": text}) + "\n")
    with pytest.raises(InputError, match=re.escape(f"row 2: 'text' must be a string, got {shown}")):
        read_manifest(manifest)


@pytest.mark.filterwarnings("ignore::UserWarning")  # the random test model does not know RefShapes' words
def test_extract_records_a_pair_with_such_text_and_runs_the_rest(tiny_model_dir, tmp_path):
    from deris_rerank.workflow.extract import extract_split

    samples = list(RefShapes("val", num_images=2, seed=5, image_size=(64, 64)))
    samples[1] = dataclasses.replace(samples[1], text=BAD_TEXT)
    extractor = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu")
    counts = extract_split(extractor, samples, tmp_path, progress=False)
    assert counts == {"written": len(samples) - 1, "skipped": 0, "failed": 1}
    errors = [json.loads(line) for line in (tmp_path / "val" / "errors.jsonl").read_text().splitlines()]
    assert [e["id"] for e in errors] == [samples[1].id] and "not valid Unicode" in errors[0]["error"]


def test_text_writers_refuse_it_with_one_line(tmp_path):
    with pytest.raises(InputError, match="training text 'the \\\\udcff cross' is not valid Unicode"):
        train_word_tokenizer(["the red cross", BAD_TEXT], tmp_path / "tok.model")
    annotation = {"image_id": 1, "expressions": ["fine", BAD_TEXT], "mask": np.eye(8, dtype=bool)}
    with pytest.raises(InputError, match=r"val\[0\]: expression 'the \\udcff cross' is not valid Unicode"):
        write_seqtr({"val": [annotation]}, tmp_path / "refs.json")
    assert not (tmp_path / "refs.json").exists()


@pytest.mark.parametrize("text, needle", [
    (123, "got int"), (None, "got None"), (b"the biggest cross", "got bytes (decode it first"),
])
def test_wrong_text_types_are_one_line_input_errors(pipe, images, text, needle):
    with pytest.raises(InputError, match="text: expected a string or a list of strings") as excinfo:
        pipe(images / "img0.png", text)
    assert needle in str(excinfo.value)


@pytest.mark.parametrize("pairs, needle", [
    ([("img0.png",)], "pair 0: expected an (image, text) or (image, text, group key) tuple, got a tuple of 1 item"),
    ([("img0.png", "a"), "img0.png"], "pair 1: expected an (image, text)"),
    (("img0.png", "the red car"), "pair 0: expected an (image, text) or (image, text, group key) tuple, got str"),
    (None, "pairs: expected a list of (image, text) tuples, got None"),
])
def test_malformed_pairs_are_one_line_input_errors(pipe, pairs, needle):
    for call in (lambda: pipe.batch(pairs), lambda: list(pipe.iter_batch(pairs))):
        with pytest.raises(InputError) as excinfo:
            call()
        assert needle in str(excinfo.value)
