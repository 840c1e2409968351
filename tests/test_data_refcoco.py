"""RefCOCO-family annotation readers: SeqTR JSON, DeRIS gRefCOCO JSON, refer layout, and the SeqTR writer."""
import json
import os
import pickle
import shlex
import sys

import cv2
import numpy as np
import pytest
import torch

from deris_rerank.data.refcoco import (
    list_splits,
    load_split,
    read_grefcoco,
    read_refer,
    read_seqtr,
    write_seqtr,
)
from deris_rerank.errors import InputError
from deris_rerank.rle import encode_mask

SIZES = {1: (24, 32), 2: (30, 20), 3: (16, 16)}  # image id -> (H, W)


def coco_name(image_id):
    return "COCO_train2014_%012d.jpg" % image_id


def box(image_id, x0, y0, x1, y1):
    """The mask of pixels x0 <= x < x1, y0 <= y < y1: what pycocotools draws for that rectangle polygon."""
    mask = np.zeros(SIZES[image_id], dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def polygon(x0, y0, x1, y1):
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def run_lengths(mask):
    """Uncompressed COCO counts, computed independently of deris_rerank.rle."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    return ([0] if flat[0] else []) + runs


# Drawn masks: A and B on image 1, C = two rectangles on image 2, D on image 2.
MASK_A = box(1, 3, 2, 13, 10)
MASK_B = box(1, 15, 12, 30, 20)
MASK_C = box(2, 1, 1, 6, 8) | box(2, 10, 20, 18, 28)
MASK_D = box(2, 4, 12, 9, 25)
POLY_A = [polygon(3, 2, 13, 10)]
POLY_B = [polygon(15, 12, 30, 20)]
POLY_C = [polygon(1, 1, 6, 8), polygon(10, 20, 18, 28)]


@pytest.fixture
def images_dir(tmp_path):
    folder = tmp_path / "train2014"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for image_id, (height, width) in SIZES.items():
        cv2.imwrite(str(folder / coco_name(image_id)), rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return folder


@pytest.fixture
def seqtr_file(tmp_path):
    """A DeRIS mixed-seg file: polygons, compressed and uncompressed RLE, several expressions per entry."""
    data = {
        "train": [{"image_id": 3, "height": 16, "width": 16, "expressions": ["anything"],
                   "bbox": [0, 0, 4, 4], "mask": encode_mask(np.eye(16, dtype=bool)), "id": 1, "category_id": 1}],
        "val_refcoco_unc": [
            {"image_id": 1, "height": 24, "width": 32, "expressions": ["the left box", "Red thing!"],
             "bbox": [3, 2, 10, 8], "mask": POLY_A, "id": 101, "category_id": 1},
            {"image_id": 1, "height": 24, "width": 32, "expressions": ["right box"],
             "bbox": [15, 12, 15, 8], "mask": encode_mask(MASK_B), "id": 102, "category_id": 1},
            {"image_id": 2, "height": 30, "width": 20, "expressions": ["two parts"],
             "bbox": [1, 1, 17, 27], "mask": POLY_C, "id": 103, "category_id": 2},
            {"image_id": 2, "height": 30, "width": 20, "expressions": ["the bar"],
             "bbox": [4, 12, 5, 13], "mask": {"size": [30, 20], "counts": run_lengths(MASK_D)}, "id": 104},
        ],
    }
    path = tmp_path / "instances_nogoogle_withid.json"
    path.write_text(json.dumps(data))
    return path


NO_TARGET = {"iscrowd": None, "bbox": None, "category_id": None, "id": -1, "bbox_mode": 1, "empty": True}


def instance(ann_id, segmentation):
    return {"id": ann_id, "iscrowd": 0, "bbox": [0, 0, 1, 1], "category_id": 1, "bbox_mode": 1,
            "empty": False, "segmentation": segmentation}


@pytest.fixture
def grefcoco_file(tmp_path):
    """DeRIS's grefs/instances.json: one entry per sentence, multi-target and no-target ones."""
    def entry(image_id, raw, annotations):
        height, width = SIZES[image_id]
        return {"source": "grefcoco", "file_name": "/elsewhere/" + coco_name(image_id), "height": height,
                "width": width, "image_id": image_id, "empty": annotations == [NO_TARGET],
                "annotations": annotations, "expressions": {"raw": raw, "sent_id": 9, "ref_id": 4}}

    data = {
        "train": [entry(3, "nothing", [NO_TARGET])],
        "val": [
            entry(1, "both boxes", [instance(101, POLY_A), instance(102, POLY_B)]),
            entry(2, "the purple elephant", [NO_TARGET]),
            entry(1, "left box", [instance(101, POLY_A)]),
        ],
    }
    path = tmp_path / "grefs_instances.json"
    path.write_text(json.dumps(data))
    return path


def coco_instances():
    images = [{"id": image_id, "file_name": coco_name(image_id), "height": height, "width": width}
              for image_id, (height, width) in SIZES.items()]
    annotations = [
        {"id": 101, "image_id": 1, "segmentation": POLY_A, "iscrowd": 0, "bbox": [3, 2, 10, 8], "category_id": 1},
        {"id": 102, "image_id": 1, "segmentation": encode_mask(MASK_B), "iscrowd": 0, "bbox": [15, 12, 15, 8],
         "category_id": 1},
        {"id": 103, "image_id": 2, "segmentation": {"size": [30, 20], "counts": run_lengths(MASK_D)}, "iscrowd": 1,
         "bbox": [4, 12, 5, 13], "category_id": 1},
        {"id": 104, "image_id": 2, "segmentation": POLY_C, "iscrowd": 0, "bbox": [1, 1, 17, 27], "category_id": 1},
    ]
    return {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}


def ref(ref_id, image_id, ann_id, split, *raws):
    sentences = [{"raw": raw, "sent": raw.lower(), "tokens": raw.lower().split(), "sent_id": 10 * ref_id + k}
                 for k, raw in enumerate(raws)]
    return {"ref_id": ref_id, "image_id": image_id, "ann_id": ann_id, "split": split, "category_id": 1,
            "file_name": "COCO_train2014_%012d_%s.jpg" % (image_id, ann_id), "sentences": sentences,
            "sent_ids": [sentence["sent_id"] for sentence in sentences]}


@pytest.fixture
def refer_root(tmp_path):
    """lichengunc/refer layout: refer_root/refcoco/refs(unc).p (a protocol-2 pickle) + instances.json."""
    folder = tmp_path / "refer" / "refcoco"
    folder.mkdir(parents=True)
    refs = [
        ref(5, 1, 101, "val", "Left box.", "the first one"),
        ref(6, 1, 102, "testA", "right box"),
        ref(7, 2, 104, "testB", "two parts"),
        ref(8, 2, 103, "train", "a crowd"),
    ]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (folder / "instances.json").write_text(json.dumps(coco_instances()))
    return tmp_path / "refer"


@pytest.fixture
def grefs_file(tmp_path):
    """gRefCOCO's own layout: grefs(unc).json + instances.json, ann_id lists and [-1]."""
    folder = tmp_path / "grefcoco"
    folder.mkdir()
    refs = [
        ref(1, 1, [101, 102], "val", "both boxes", "everything on the left and right"),
        ref(2, 2, [-1], "val", "a unicorn"),
        ref(3, 2, [104, 103], "val", "parts and the crowd"),
        ref(4, 3, [-1], "train", "nothing"),
    ]
    (folder / "grefs(unc).json").write_text(json.dumps(refs))
    (folder / "instances.json").write_text(json.dumps(coco_instances()))
    return folder / "grefs(unc).json"


def masks_of(samples):
    return [sample.target_mask() for sample in samples]


def assert_masks(samples, expected):
    actual = masks_of(samples)
    assert len(actual) == len(expected)
    for mask, want in zip(actual, expected):
        assert mask.dtype == np.bool_ and mask.shape == want.shape
        np.testing.assert_array_equal(mask, want)


def one_line_error(call, *patterns):
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for pattern in patterns:
        assert pattern in message, message
    return message


# ------------------------------------------------------------------------------------ SeqTR


def test_seqtr_pairs_ids_texts_and_masks(seqtr_file, images_dir):
    samples = read_seqtr(seqtr_file, images_dir, "val_refcoco_unc")
    assert [s.id for s in samples] == [
        "val_refcoco_unc_0_0", "val_refcoco_unc_0_1", "val_refcoco_unc_1_0", "val_refcoco_unc_2_0",
        "val_refcoco_unc_3_0",
    ]
    assert [s.text for s in samples] == ["the left box", "Red thing!", "right box", "two parts", "the bar"]
    assert {s.split for s in samples} == {"val_refcoco_unc"}
    assert [s.image_id for s in samples] == ["1", "1", "1", "2", "2"]
    assert [s.image for s in samples] == [images_dir / coco_name(i) for i in (1, 1, 1, 2, 2)]
    assert all(s.num_targets == 1 for s in samples)
    assert_masks(samples, [MASK_A, MASK_A, MASK_B, MASK_C, MASK_D])
    assert samples[3].load_image().shape == (30, 20, 3)
    assert list_splits(seqtr_file) == ["train", "val_refcoco_unc"]


def test_seqtr_samples_pickle_with_their_masks(seqtr_file, images_dir):
    """DataLoader workers receive samples by pickling: the lazy mask must survive it."""
    sample = read_seqtr(seqtr_file, images_dir, "val_refcoco_unc")[3]
    clone = pickle.loads(pickle.dumps(sample))
    assert clone == sample
    np.testing.assert_array_equal(clone.target_mask(), MASK_C)


def test_seqtr_size_falls_back_to_the_image(tmp_path, images_dir):
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"val": [{"image_id": 2, "expressions": ["two parts"], "mask": POLY_C}]}))
    np.testing.assert_array_equal(read_seqtr(path, images_dir, "val")[0].target_mask(), MASK_C)


def test_seqtr_errors(seqtr_file, images_dir, tmp_path):
    one_line_error(lambda: read_seqtr(tmp_path / "missing.json", images_dir, "val"),
                   "annotation file not found", "missing.json")
    one_line_error(lambda: read_seqtr(seqtr_file, images_dir, "val"),
                   str(seqtr_file), "no split 'val'", "available: train, val_refcoco_unc")
    one_line_error(lambda: read_seqtr(seqtr_file, tmp_path / "no_images", "train"), "images folder not found")

    broken = tmp_path / "broken.json"
    broken.write_text('{"val": [')
    one_line_error(lambda: read_seqtr(broken, images_dir, "val"), str(broken), "invalid JSON")
    broken.write_text('["val"]')
    one_line_error(lambda: read_seqtr(broken, images_dir, "val"), str(broken), "mapping split names to lists")
    broken.write_text(json.dumps(coco_instances()))
    one_line_error(lambda: read_seqtr(broken, images_dir, "val"), "COCO instances.json", "refs(...).p")

    entry = {"image_id": 1, "height": 24, "width": 32, "expressions": ["x"], "mask": POLY_A}
    for field in ("mask", "expressions", "image_id"):
        broken.write_text(json.dumps({"val": [entry, {k: v for k, v in entry.items() if k != field}]}))
        one_line_error(lambda: read_seqtr(broken, images_dir, "val"), str(broken), "val[1]", f"missing field {field!r}")
    broken.write_text(json.dumps({"val": [dict(entry, mask="polygon")]}))
    one_line_error(lambda: read_seqtr(broken, images_dir, "val"), "val[0]", "mask must be polygons")
    broken.write_text(json.dumps({"val": [dict(entry, file_name="../outside.jpg")]}))
    one_line_error(lambda: read_seqtr(broken, images_dir, "val"), "must be relative to the images folder")

    broken.write_text(json.dumps({"val": [dict(entry, mask=encode_mask(MASK_D))]}))  # 30x20 RLE on a 24x32 image
    sample = read_seqtr(broken, images_dir, "val")[0]
    one_line_error(sample.target_mask, str(broken), "val[0]", "differs from the image size")


def test_polygons_need_pycocotools(seqtr_file, images_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)
    monkeypatch.setitem(sys.modules, "pycocotools.mask", None)
    one_line_error(lambda: read_seqtr(seqtr_file, images_dir, "val_refcoco_unc"), "pip install pycocotools")
    train = read_seqtr(seqtr_file, images_dir, "train")  # RLE only: no pycocotools needed
    np.testing.assert_array_equal(train[0].target_mask(), np.eye(16, dtype=bool))


# --------------------------------------------------------------------------------- gRefCOCO


def test_grefcoco_multi_and_no_target(grefcoco_file, images_dir):
    samples = read_grefcoco(grefcoco_file, images_dir, "val")
    assert [s.id for s in samples] == ["val_0_0", "val_1_0", "val_2_0"]
    assert [s.text for s in samples] == ["both boxes", "the purple elephant", "left box"]
    assert [s.num_targets for s in samples] == [2, 0, 1]
    assert [s.image for s in samples] == [images_dir / coco_name(i) for i in (1, 2, 1)]
    assert_masks(samples, [MASK_A | MASK_B, np.zeros(SIZES[2], dtype=bool), MASK_A])
    assert list_splits(grefcoco_file) == ["train", "val"]
    instances = [s.instance_masks() for s in samples]  # each referred object on its own
    assert np.array_equal(instances[0], np.stack([MASK_A, MASK_B])) and instances[1].shape == (0, *SIZES[2])
    assert np.array_equal(instances[2], MASK_A[None])


def test_grefcoco_rejects_the_seqtr_layout(seqtr_file, images_dir):
    one_line_error(lambda: read_grefcoco(seqtr_file, images_dir, "val_refcoco_unc"),
                   str(seqtr_file), "val_refcoco_unc[0]", "expressions must be an object")


# ------------------------------------------------------------------------------------ refer


def test_refer_pickle_layout(refer_root, images_dir):
    samples = read_refer(refer_root, images_dir, "val")
    assert [s.id for s in samples] == ["val_5_0", "val_5_1"]
    assert [s.text for s in samples] == ["Left box.", "the first one"]
    assert [s.image for s in samples] == [images_dir / coco_name(1)] * 2
    assert [s.num_targets for s in samples] == [1, 1]
    assert_masks(samples, [MASK_A, MASK_A])

    test_a = read_refer(refer_root / "refcoco", images_dir, "testA")  # the dataset folder itself works too
    assert [s.id for s in test_a] == ["testA_6_0"]
    assert_masks(test_a, [MASK_B])
    assert [s.id for s in read_refer(refer_root, images_dir, "test")] == ["test_6_0", "test_7_0"]
    assert_masks(read_refer(refer_root, images_dir, "train"), [MASK_D])  # a crowd RLE, uncompressed counts
    assert list_splits(refer_root / "refcoco") == ["val", "testA", "testB", "train"]


def python2_pickle(value):
    """`value` (lists, dicts, str, small non-negative ints) as Python 2's cPickle writes it at
    protocol 2: text as byte strings (SHORT_BINSTRING), which a Python 3 reader must decode."""
    def encode(item):
        if isinstance(item, str):
            data = item.encode("utf-8")
            return b"U" + bytes([len(data)]) + data
        if isinstance(item, int):
            return b"J" + item.to_bytes(4, "little")
        if isinstance(item, list):
            return b"](" + b"".join(map(encode, item)) + b"e"
        return b"}(" + b"".join(encode(key) + encode(val) for key, val in item.items()) + b"u"
    return b"\x80\x02" + encode(value) + b"."


def test_refer_reads_python2_pickles(refer_root, images_dir):
    refs = [ref(5, 1, 101, "val", "caf\u00e9 on the left")]
    (refer_root / "refcoco" / "refs(unc).p").write_bytes(python2_pickle(refs))
    samples = read_refer(refer_root, images_dir, "val")
    assert [(s.id, s.text) for s in samples] == [("val_5_0", "caf\u00e9 on the left")]
    assert_masks(samples, [MASK_A])


def test_refer_errors(refer_root, images_dir, tmp_path):
    one_line_error(lambda: read_refer(refer_root, images_dir, "testC"),
                   "refs(unc).p", "no split 'testC'", "available: val, testA, testB, train")
    one_line_error(lambda: read_refer(refer_root, images_dir, "val", split_by="google"),
                   "refer annotations not found", "refs(google).p")
    (refer_root / "refcoco" / "instances.json").unlink()
    one_line_error(lambda: read_refer(refer_root, images_dir, "val"), "instances file", "not found")


class RunsCode:
    """Unpickling this would run a shell command (what a malicious refs file could do)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_refer_pickle_that_runs_code_is_refused(tmp_path, images_dir):
    folder = tmp_path / "refcoco"
    folder.mkdir()
    sentinel = tmp_path / "sentinel"
    refs = [ref(5, 1, 101, "val", "left box"), RunsCode("touch " + shlex.quote(str(sentinel)))]
    (folder / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (folder / "instances.json").write_text(json.dumps(coco_instances()))

    for read in (lambda: read_refer(folder, images_dir, "val"), lambda: load_split(folder, images_dir, "val")):
        message = one_line_error(read, "refusing to load refs file", "refs(unc).p", "for safety", "system")
        assert "could run code" in message
    assert not sentinel.exists()

    (folder / "refs(unc).p").write_bytes(b"\x80\x02not a pickle")
    one_line_error(lambda: read_refer(folder, images_dir, "val"), "not a valid pickle")


def test_grefcoco_refer_layout(grefs_file, images_dir):
    samples = read_grefcoco(grefs_file, images_dir, "val")
    assert [s.id for s in samples] == ["val_1_0", "val_1_1", "val_2_0", "val_3_0"]
    assert [s.num_targets for s in samples] == [2, 2, 0, 1]  # crowd annotation 103 left out, as grefer/ReLA do
    assert_masks(samples, [MASK_A | MASK_B, MASK_A | MASK_B, np.zeros(SIZES[2], dtype=bool), MASK_C])
    assert [s.instance_masks().shape[0] for s in samples] == [2, 2, 0, 1]
    assert np.array_equal(samples[0].instance_masks().any(axis=0), MASK_A | MASK_B)
    same = read_refer(grefs_file.parent.parent, images_dir, "val", dataset="grefcoco")
    assert [s.id for s in same] == [s.id for s in samples]


# ------------------------------------------------------------------------------- load_split


def test_load_split_picks_the_reader(seqtr_file, grefcoco_file, refer_root, grefs_file, images_dir):
    def summary(samples):
        return [(s.id, s.text, s.num_targets) for s in samples]

    assert summary(load_split(seqtr_file, images_dir, "val_refcoco_unc")) == summary(
        read_seqtr(seqtr_file, images_dir, "val_refcoco_unc"))
    assert summary(load_split(str(grefcoco_file), images_dir, "val")) == summary(
        read_grefcoco(grefcoco_file, images_dir, "val"))
    assert summary(load_split(refer_root / "refcoco" / "refs(unc).p", images_dir, "val")) == summary(
        read_refer(refer_root, images_dir, "val"))
    assert summary(load_split(grefs_file.parent, images_dir, "val")) == summary(
        read_grefcoco(grefs_file, images_dir, "val"))
    one_line_error(lambda: load_split(refer_root, images_dir, "val"), "must hold exactly one refs")


# ----------------------------------------------------------------------------------- writer


def test_write_seqtr_round_trip(tmp_path, images_dir):
    rng = np.random.default_rng(1)
    random_mask = rng.random((24, 32)) < 0.3
    splits = {
        "train": [{"image_id": 3, "expressions": "a diagonal", "mask": torch.eye(16, dtype=torch.bool)}],
        "val": [
            {"image_id": 1, "expressions": ["speckles", "noise"], "mask": random_mask, "category_id": 7},
            {"image_id": 2, "expressions": ["two parts"], "mask": POLY_C, "height": 30, "width": 20},
            {"image_id": "shape-0004", "file_name": "shapes/0004.png", "expressions": ["nothing here"],
             "mask": np.zeros((10, 12), dtype=np.uint8), "num_targets": 0},
            {"image_id": np.int64(2), "expressions": ["the bar"], "mask": encode_mask(MASK_D), "id": 55},
        ],
    }
    path = write_seqtr(splits, tmp_path / "out" / "refshapes.json")
    assert list_splits(path) == ["train", "val"]

    samples = read_seqtr(path, images_dir, "val")
    assert [s.id for s in samples] == ["val_0_0", "val_0_1", "val_1_0", "val_2_0", "val_3_0"]
    assert [s.text for s in samples] == ["speckles", "noise", "two parts", "nothing here", "the bar"]
    assert [s.image_id for s in samples] == ["1", "1", "2", "shape-0004", "2"]
    assert [s.image for s in samples] == [images_dir / coco_name(1)] * 2 + [
        images_dir / coco_name(2), images_dir / "shapes" / "0004.png", images_dir / coco_name(2)]
    assert [s.num_targets for s in samples] == [1, 1, 1, 0, 1]
    assert_masks(samples, [random_mask, random_mask, MASK_C, np.zeros((10, 12), dtype=bool), MASK_D])
    assert_masks(read_seqtr(path, images_dir, "train"), [np.eye(16, dtype=bool)])

    written = json.loads(path.read_text())["val"]
    assert [entry["id"] for entry in written] == [1, 2, 3, 55]
    assert written[1]["bbox"] == [1.0, 1.0, 17.0, 27.0]  # tight box of MASK_C, as pycocotools' toBbox
    assert written[2]["bbox"] == [0.0, 0.0, 0.0, 0.0]
    assert (written[1]["height"], written[1]["width"]) == (30, 20)
    assert all(isinstance(entry["mask"]["counts"], str) for entry in written)


def test_write_seqtr_errors(tmp_path):
    target = tmp_path / "ann.json"
    good = {"image_id": 1, "expressions": ["x"], "mask": MASK_A}
    one_line_error(lambda: write_seqtr({"val": [dict(good, colour="red")]}, target), "val[0]", "unknown keys ['colour']")
    one_line_error(lambda: write_seqtr({"val": [dict(good, mask=POLY_A)]}, target), "need 'height' and 'width'")
    one_line_error(lambda: write_seqtr({"val": [dict(good, height=10, width=10)]}, target), "differs from height x width")
    one_line_error(lambda: write_seqtr({"val": [dict(good, image_id="a")]}, target), "image_id must be an integer")
    one_line_error(lambda: write_seqtr({"val": [dict(good, expressions=[])]}, target), "non-empty list of strings")
    one_line_error(lambda: write_seqtr({"val": [dict(good, mask=MASK_A.astype(float))]}, target), "bool or integer")
    one_line_error(lambda: write_seqtr([good], target), "splits must be a dict")
    assert not target.exists()


def test_grefcoco_through_extract_and_evaluate(grefcoco_file, images_dir, tiny_model_dir, tmp_path, capsys):
    from deris_rerank import cli
    from deris_rerank.rerank.cache import read_cache

    code = cli.main(["extract", "--data", str(grefcoco_file), "--images", str(images_dir), "--split", "val",
                     "--out", str(tmp_path / "cache"), "--deris", str(tiny_model_dir / "deris"), "--device", "cpu", "--quiet"])
    assert code == 0
    tensors, ids, _ = read_cache([tmp_path / "cache" / "val"])
    assert ids == ["val_0_0", "val_1_0", "val_2_0"]
    assert tensors["num_targets"].tolist() == [2, 0, 1] and tensors["target_area"][1] == 0
    assert tensors["query_masks"].shape == (3, 10, 96 * 96 // 8)
    # the no-target pair: every candidate's IoU is 0 unless it is empty too; no referred instance to match
    assert (tensors["query_instance"][1] == -1).all()
    capsys.readouterr()
    assert cli.main(["evaluate", "--cache", str(tmp_path / "cache" / "val"), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "Set answers (GRES" in printed and "| oracle set |" in printed and "| DeRIS union (threshold" in printed
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    oracle = report["sets"]["rows"][-1]
    assert oracle["name"] == "oracle set" and oracle["n_acc"] == 100.0 and oracle["pairs_none"] == 1
