"""COCO RLE: hand-checked strings, round trips, and byte equality with pycocotools."""
import numpy as np
import pytest
import torch

from deris_rerank.errors import InputError
from deris_rerank.rle import decode_mask, encode_mask


def random_masks(seed, count, max_side=41):
    """Random bool masks of random (mostly odd) sizes and densities."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        height, width = rng.integers(1, max_side, size=2)
        yield rng.random((height, width)) < rng.random()


def blocky_masks(seed, count, side=300):
    """Masks [side, side] made of a few long column-major runs, many over 2**15 pixels long."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        cuts = np.sort(rng.choice(side * side, size=rng.integers(1, 6), replace=False))
        flat = np.zeros(side * side, dtype=bool)
        for start, stop in zip(cuts[::2], list(cuts[1::2]) + [side * side]):
            flat[start:stop] = True
        yield flat.reshape((side, side), order="F")


def run_lengths(mask):
    """COCO's uncompressed counts of a mask, computed independently of deris_rerank.rle."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    return ([0] if flat[0] else []) + runs


@pytest.mark.parametrize(
    "column, counts, text",
    [
        ([0, 0, 0, 1, 0, 0, 0], [3, 1, 3], "313"),  # index 2 is stored as is, not as a difference
        ([0, 0, 0, 1, 1, 0, 1, 0, 0], [3, 2, 1, 1, 2], "321O1"),  # 1 - 2 = -1 -> 'O'; 2 - 1 = 1
        ([1] * 40, [0, 40], "0X1"),  # 40 = 8 + 1 * 32: two 5-bit groups, the first with the "more" bit
        ([0] * 16 + [1], [16, 1], "`01"),  # 16 has bit 4 (sign) set: '`' = 48 + 16 + 32, then a 0 group
    ],
)
def test_known_strings(column, counts, text):
    mask = np.array(column, dtype=bool)[:, None]
    rle = encode_mask(mask)
    assert rle == {"size": [len(column), 1], "counts": text}
    np.testing.assert_array_equal(decode_mask(rle), mask)
    np.testing.assert_array_equal(decode_mask({"size": [len(column), 1], "counts": counts}), mask)


def test_column_major_order():
    mask = np.array([[1, 0, 0], [1, 1, 0]], dtype=np.uint8)  # columns: 11, 01, 00 -> runs 0, 2, 1, 1, 2
    assert encode_mask(mask) == {"size": [2, 3], "counts": "021O1"}
    np.testing.assert_array_equal(decode_mask({"size": [2, 3], "counts": "021O1"}), mask.astype(bool))


def test_two_by_two():
    rle = encode_mask(np.array([[0, 1], [1, 1]], dtype=bool))
    assert rle == {"size": [2, 2], "counts": "13"}


@pytest.mark.parametrize(
    "mask, counts",
    [
        (np.zeros((3, 5), bool), "?"),  # one run of 15 zeros
        (np.ones((3, 5), bool), "0?"),  # no zeros, then 15 ones
        (np.zeros((1, 1), bool), "1"),
        (np.ones((1, 1), bool), "01"),
        (np.zeros((0, 4), bool), "0"),
    ],
)
def test_uniform_and_tiny_masks(mask, counts):
    rle = encode_mask(mask)
    assert rle == {"size": list(mask.shape), "counts": counts}
    decoded = decode_mask(rle)
    assert decoded.dtype == np.bool_
    np.testing.assert_array_equal(decoded, mask)


def test_round_trip_random():
    for mask in random_masks(seed=0, count=200):
        decoded = decode_mask(encode_mask(mask))
        assert decoded.shape == mask.shape
        np.testing.assert_array_equal(decoded, mask)


def test_first_pixel_set_starts_with_empty_run():
    mask = np.zeros((5, 7), bool)
    mask[0, 0] = True
    mask[2:4, 3:6] = True
    assert encode_mask(mask)["counts"][0] == "0"
    np.testing.assert_array_equal(decode_mask(encode_mask(mask)), mask)


def test_inputs_of_any_kind_give_the_same_string():
    mask = next(random_masks(seed=1, count=1, max_side=30))
    expected = encode_mask(mask)
    assert encode_mask(mask.astype(np.uint8)) == expected
    assert encode_mask(mask.astype(np.uint8) * 255) == expected  # nonzero is foreground
    assert encode_mask(torch.from_numpy(mask)) == expected
    assert encode_mask(np.ascontiguousarray(mask.T).T) == expected  # memory layout does not matter
    assert decode_mask({**expected, "counts": expected["counts"].encode()}).tolist() == mask.tolist()


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 2, 1), bool),
        np.zeros((2, 2), np.float32),
    ],
)
def test_encode_rejects_bad_masks(bad):
    with pytest.raises(InputError):
        encode_mask(bad)


@pytest.mark.parametrize(
    "rle",
    [
        {"size": [2, 2], "counts": "12"},  # 3 pixels for 4
        {"size": [2, 2], "counts": [1, 2, 3]},  # 6 pixels for 4
        {"size": [2, 2], "counts": "1X"},  # last count never ends
        {"size": [2, 2], "counts": "1~"},  # not a COCO character
        {"counts": "4"},
    ],
)
def test_decode_rejects_bad_rles(rle):
    with pytest.raises(InputError):
        decode_mask(rle)


# pycocotools' own decode trips NumPy 2's `copy` deprecation warning; it is not ours to fix.
PYCOCOTOOLS_NUMPY2_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"


@pytest.mark.filterwarnings(PYCOCOTOOLS_NUMPY2_WARNING)
def test_matches_pycocotools():
    coco_mask = pytest.importorskip("pycocotools.mask")
    masks = list(random_masks(seed=2, count=150)) + list(blocky_masks(seed=3, count=30))
    masks += [np.zeros((7, 9), bool), np.ones((9, 7), bool), np.ones((1, 1), bool)]
    assert sum(max(run_lengths(mask)) > 2**15 for mask in masks) >= 10
    for mask in masks:
        theirs = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        ours = encode_mask(mask)
        assert ours["size"] == list(theirs["size"])
        assert ours["counts"] == theirs["counts"].decode("ascii")
        np.testing.assert_array_equal(coco_mask.decode(ours).astype(bool), mask)
        np.testing.assert_array_equal(decode_mask(theirs), mask)


def test_uncompressed_counts_match_pycocotools():
    coco_mask = pytest.importorskip("pycocotools.mask")
    for mask in random_masks(seed=4, count=20):
        uncompressed = {"size": list(mask.shape), "counts": run_lengths(mask)}
        compressed = coco_mask.frPyObjects(uncompressed, *mask.shape)
        np.testing.assert_array_equal(decode_mask(uncompressed), mask)
        assert encode_mask(mask)["counts"] == compressed["counts"].decode("ascii")
