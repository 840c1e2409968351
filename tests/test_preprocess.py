import io
import warnings

import cv2
import numpy as np
import pytest
import sentencepiece
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import deris_rerank.images as images
from deris_rerank.errors import CheckpointError, InputError
from deris_rerank.candidates import deris_answer_mask
from deris_rerank.deris.answer import refer_scores
from deris_rerank.images import load_image
from deris_rerank.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Beit3Tokenizer, clean_text
from deris_rerank.transforms import prepare_images, resize_mask_nearest

SCORE_THRESHOLD = 0.9  # DeRIS-L refcoco config, used to build the fixture's masks

CORPUS = [
    "the man on the left",
    "a woman in a red shirt standing near the window",
    "the little boy with the orange shirt",
    "dog sitting on the right side of the couch",
    "second car from the left behind the truck",
    "white plate near the blue cup on the table",
    "person wearing blue jeans and a black jacket",
    "the giraffe behind the tree",
    "black cat under the wooden table",
]


@pytest.fixture(scope="module")
def fixture_inputs(reference_dir):
    return load_file(str(reference_dir / "parity_small_A" / "inputs.safetensors"))


@pytest.fixture(scope="module")
def fixture_outputs(reference_dir):
    return load_file(str(reference_dir / "parity_small_A" / "outputs.safetensors"))


@pytest.fixture(scope="module")
def spm_model_path(tmp_path_factory):
    """A tiny BPE sentencepiece model with the XLM-R layout (unk 0, bos 1, eos 2)."""
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 30), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "toy"),
        vocab_size=150,
        model_type="bpe",
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return folder / "toy.model"


@pytest.fixture(scope="module")
def spm_processor(spm_model_path):
    return sentencepiece.SentencePieceProcessor(model_file=str(spm_model_path))


@pytest.fixture(scope="module")
def tokenizer(spm_model_path):
    return Beit3Tokenizer(spm_model_path)


def raw_rgb(fixture_inputs, b):
    return np.ascontiguousarray(fixture_inputs[f"raw_image_bgr.b{b}"].numpy()[..., ::-1])


def gradient_image(height, width):
    """Smooth, asymmetric uint8 RGB test image (R grows along x, G along y)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [255 * x / (width - 1), 255 * y / (height - 1), np.full_like(x, 90.0)], axis=-1
    ).round().astype(np.uint8)


# ---------------------------------------------------------------- images


def test_prepare_images_bit_exact_on_fixture(fixture_inputs):
    for b in range(2):
        img, img_mini = prepare_images(raw_rgb(fixture_inputs, b), 384, 224)
        assert img.dtype == img_mini.dtype == torch.float32
        assert img.shape == (3, 384, 384) and img_mini.shape == (3, 224, 224)
        assert img.is_contiguous() and img_mini.is_contiguous()
        assert torch.equal(img, fixture_inputs["img"][b])
        assert torch.equal(img_mini, fixture_inputs["img_mini"][b])


def test_image_sources_give_identical_tensors(tmp_path):
    # a textured, non-square photo-like image (bit-exactness against upstream: test_prepare_images_bit_exact_on_fixture)
    rng = np.random.default_rng(11)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (150, 211, 3), dtype=np.uint8), (7, 7), 2)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    path = tmp_path / "sample.png"
    assert cv2.imwrite(str(path), bgr)
    from_path, from_str = load_image(path), load_image(str(path))
    from_pil, from_array = load_image(Image.fromarray(rgb)), load_image(rgb)
    for loaded in (from_path, from_str, from_pil, from_array):
        assert loaded.dtype == np.uint8 and loaded.flags["C_CONTIGUOUS"]
        assert np.array_equal(loaded, rgb)
    reference = prepare_images(rgb, 384, 224)
    for loaded in (from_path, from_pil, from_array):
        img, img_mini = prepare_images(loaded, 384, 224)
        assert torch.equal(img, reference[0]) and torch.equal(img_mini, reference[1])
    non_contiguous = bgr[..., ::-1]
    assert not non_contiguous.flags["C_CONTIGUOUS"]
    assert torch.equal(prepare_images(non_contiguous, 384, 224)[0], reference[0])


def test_exif_orientation_applied_from_path_and_pil(tmp_path):
    stored = gradient_image(40, 64)  # as stored in the file: 40 x 64
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    displayed = np.rot90(stored, k=-1).astype(np.int16)
    wrong_way = np.rot90(stored, k=1).astype(np.int16)
    with Image.open(path) as pil_image:
        from_pil = load_image(pil_image)
    for loaded in (load_image(path), from_pil):
        assert loaded.shape == (64, 40, 3)
        assert np.abs(loaded.astype(np.int16) - displayed).mean() < 3.0
        assert np.abs(loaded.astype(np.int16) - wrong_way).mean() > 50.0


def test_load_image_rejects_bad_inputs(tmp_path):
    good = np.zeros((8, 10, 3), np.uint8)
    bad_arrays = [
        good.astype(np.float32),
        np.zeros((8, 10, 4), np.uint8),
        np.zeros((3, 8, 10), np.uint8),
        np.zeros((8, 10), np.uint8),
        np.zeros((0, 10, 3), np.uint8),
    ]
    for array in bad_arrays:
        with pytest.raises(InputError, match=r"uint8 NumPy array of shape \(H, W, 3\)"):
            load_image(array)
        with pytest.raises(InputError, match=r"\(H, W, 3\)"):
            prepare_images(array, 384, 224)
    with pytest.raises(InputError, match="channels first"):
        load_image(np.zeros((3, 8, 10), np.uint8))
    missing = tmp_path / "no_such_image.jpg"
    with pytest.raises(InputError, match="no_such_image.jpg"):
        load_image(missing)
    with pytest.raises(InputError, match="not found"):
        load_image(str(missing))
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("this is not an image\n")
    with pytest.raises(InputError, match="notes.jpg"):
        load_image(text_file)
    empty_file = tmp_path / "empty.png"
    empty_file.write_bytes(b"")
    with pytest.raises(InputError, match="empty.png"):
        load_image(empty_file)
    with pytest.raises(InputError, match="directory|not found"):
        load_image(tmp_path)
    for other in (torch.zeros(8, 10, 3, dtype=torch.uint8), [[0, 0, 0]], 3):
        with pytest.raises(InputError, match="expected a file path, a PIL.Image or a uint8 NumPy array"):
            load_image(other)
    with pytest.raises(InputError, match="image_size"):
        prepare_images(good, image_size=0, image_size_lo=224)


# ---------------------------------------------------------------- text


def test_clean_text_matches_upstream_rule():
    assert clean_text("Man, on the LEFT!") == "man on the left"
    assert clean_text("red/blue t-shirt") == "red blue t shirt"
    assert clean_text("it's \"the\" (big) one*#:;?.") == "its the big one"
    assert clean_text("  two  spaces ") == "  two  spaces "  # white space is left to sentencepiece


def test_token_ids_layout_and_mask(tokenizer, spm_processor):
    text = "the man on the left"
    spm_ids = spm_processor.encode(text)
    assert len(spm_ids) >= 2 and 0 not in spm_ids
    ids, padding_mask = tokenizer.encode(text, max_tokens=20)
    assert ids.dtype == padding_mask.dtype == torch.int64
    assert ids.shape == padding_mask.shape == (20,)
    n = len(spm_ids)
    assert ids[0] == BOS_ID and ids[n + 1] == EOS_ID
    assert ids[1 : n + 1].tolist() == [i + 1 for i in spm_ids]
    assert (ids[n + 2 :] == PAD_ID).all()
    assert padding_mask.tolist() == [0] * (n + 2) + [1] * (20 - n - 2)
    assert tokenizer.content_ids(text) == [i + 1 for i in spm_ids]
    assert tokenizer.vocab_size == spm_processor.get_piece_size() + 2


def test_tokenizer_cleans_before_encoding(tokenizer):
    ids_raw, mask_raw = tokenizer.encode("Man, on the LEFT!", max_tokens=20)
    ids_clean, mask_clean = tokenizer.encode("man on the left", max_tokens=20)
    assert torch.equal(ids_raw, ids_clean) and torch.equal(mask_raw, mask_clean)
    assert tokenizer.content_ids("red/blue") == tokenizer.content_ids("red blue")
    assert tokenizer.content_ids("t-shirt") == tokenizer.content_ids("t shirt")
    assert tokenizer.content_ids("t-shirt") != tokenizer.content_ids("tshirt")


def test_unknown_and_special_tokens(tokenizer, spm_processor):
    with_unknown = tokenizer.content_ids("the ж man")
    assert UNK_ID in with_unknown
    assert with_unknown == [UNK_ID if i == 0 else i + 1 for i in spm_processor.encode("the ж man")]
    mask_id = spm_processor.get_piece_size() + 1
    man = tokenizer.content_ids("man")
    assert tokenizer.content_ids("man <s> man") == man + [BOS_ID] + man
    assert tokenizer.content_ids("man <mask>") == man + [mask_id]
    assert tokenizer.content_ids("<pad>") == [PAD_ID]
    ids, padding_mask = tokenizer.encode("<pad>", max_tokens=5)
    assert ids.tolist() == [BOS_ID, PAD_ID, EOS_ID, PAD_ID, PAD_ID]
    assert padding_mask.tolist() == [0, 0, 0, 1, 1]  # from the length, not from the id value


def test_truncation_warns_and_keeps_first_tokens(tokenizer):
    text = "the little boy with the orange shirt"
    content = tokenizer.content_ids(text)
    assert len(content) > 6
    with pytest.warns(UserWarning, match="truncated") as record:
        ids, padding_mask = tokenizer.encode(text, max_tokens=6)
    assert len(record) == 1
    assert ids.tolist() == [BOS_ID] + content[:4] + [EOS_ID]
    assert padding_mask.tolist() == [0] * 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.encode(text, max_tokens=len(content) + 2)
        tokenizer.encode_batch([text, "man"], max_tokens=len(content) + 2)
    with pytest.warns(UserWarning, match="2 of 3 texts truncated") as record:
        tokenizer.encode_batch([text, "man", text], max_tokens=6)
    assert len(record) == 1


def test_encode_batch_shapes_and_rows(tokenizer):
    texts = ["the man on the left", "dog", "white plate near the blue cup"]
    ids, padding_mask = tokenizer.encode_batch(texts, max_tokens=50)
    assert ids.shape == padding_mask.shape == (3, 50)
    assert ids.dtype == padding_mask.dtype == torch.int64
    for b, text in enumerate(texts):
        row_ids, row_mask = tokenizer.encode(text, max_tokens=50)
        assert torch.equal(ids[b], row_ids) and torch.equal(padding_mask[b], row_mask)
    # padding length never changes the real tokens
    short_ids, short_mask = tokenizer.encode_batch(texts, max_tokens=20)
    assert torch.equal(ids[:, :20], short_ids) and torch.equal(padding_mask[:, :20], short_mask)


def test_empty_texts_and_bad_arguments_raise(tokenizer, tmp_path):
    for text in ("", "   ", "?!.,", " - / ", "\n\t"):
        with pytest.raises(InputError, match="empty after cleaning|no tokens"):
            tokenizer.encode(text, max_tokens=20)
    with pytest.raises(InputError):
        tokenizer.encode_batch(["man", ""], max_tokens=20)
    with pytest.raises(InputError, match="expected a str"):
        tokenizer.encode(None, max_tokens=20)
    with pytest.raises(InputError, match="non-empty list"):
        tokenizer.encode_batch("man", max_tokens=20)
    with pytest.raises(InputError, match="non-empty list"):
        tokenizer.encode_batch([], max_tokens=20)
    with pytest.raises(InputError, match="max_tokens"):
        tokenizer.encode("man", max_tokens=2)
    missing = tmp_path / "beit3.spm"
    with pytest.raises(CheckpointError, match="beit3.spm"):
        Beit3Tokenizer(missing)
    garbage = tmp_path / "garbage.spm"
    garbage.write_bytes(b"not a sentencepiece model")
    with pytest.raises(CheckpointError, match="garbage.spm"):
        Beit3Tokenizer(garbage)


# ---------------------------------------------------------------- answer


def masks_384(stride4_logits):
    """Upstream's pred_masks: bilinear x4 upsample computed in float32, cast back."""
    return F.interpolate(stride4_logits.float(), size=(384, 384), mode="bilinear", align_corners=True).double()


def test_answer_mask_reproduces_fixture(fixture_outputs):
    scores = refer_scores(fixture_outputs["final.pred_refer_logits"])
    assert scores.dtype == torch.float64
    assert (scores - fixture_outputs["final.refer_score"]).abs().max() <= 1e-12
    answer = deris_answer_mask(masks_384(fixture_outputs["final.pred_masks_stride4"]), scores, SCORE_THRESHOLD)
    assert answer.dtype == torch.bool and answer.shape == (2, 384, 384)
    assert torch.equal(answer, fixture_outputs["final.global_mask_384"].bool())
    assert answer.any(dim=(-2, -1)).all()  # fixture A: every sample has a passing query
    for b in range(2):
        original = fixture_outputs[f"final.global_mask_original.b{b}"].bool()
        assert torch.equal(resize_mask_nearest(answer[b], tuple(original.shape)), original)


def test_answer_mask_reproduces_batch_size_one_fixture(fixture_outputs):
    scores = refer_scores(fixture_outputs["bs1.pred_refer_logits"])
    assert (scores - fixture_outputs["bs1.refer_score"]).abs().max() <= 1e-12
    answer = deris_answer_mask(masks_384(fixture_outputs["bs1.pred_masks_stride4"]), scores, SCORE_THRESHOLD)
    assert torch.equal(answer, fixture_outputs["bs1.global_mask_384"].bool())


def test_answer_mask_empty_when_no_score_passes():
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 10, 384, 384, generator=generator, dtype=torch.float64) + 2  # most pixels pass 0.5
    scores = refer_scores(torch.randn(2, 10, 2, generator=generator, dtype=torch.float64))
    assert deris_answer_mask(logits, scores, score_threshold=0.0).any()
    answer = deris_answer_mask(logits, scores, score_threshold=1.0)
    assert answer.shape == (2, 384, 384) and not answer.any()


def test_answer_mask_thresholds_are_strict_and_inclusive():
    logits = torch.tensor([[[0.0, -1.0]], [[-1.0, 2.0]], [[5.0, 5.0]]], dtype=torch.float64)  # N=3, 1x2 masks
    scores = torch.tensor([0.95, 0.9, 0.2], dtype=torch.float64)
    answer = deris_answer_mask(logits, scores, score_threshold=0.9)
    assert answer.tolist() == [[True, False]]  # score 0.9 is not > 0.9; sigmoid(0) = 0.5 is >= 0.5
    batched = deris_answer_mask(logits.expand(4, 2, -1, -1, -1), scores.expand(4, 2, -1), 0.9)
    assert batched.shape == (4, 2, 1, 2) and (batched == answer).all()
    with pytest.raises(InputError, match="scores"):
        deris_answer_mask(logits, scores[:2], 0.9)


def test_refer_scores_is_class_zero_probability():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [-1.0, 3.0]], dtype=torch.float64)
    expected = torch.sigmoid(logits[:, 0] - logits[:, 1])
    assert torch.allclose(refer_scores(logits), expected, rtol=0, atol=1e-15)
    half = refer_scores(logits.half())
    assert half.dtype == torch.float32 and torch.allclose(half, expected.float(), atol=1e-3)


def test_resize_mask_nearest_matches_cv2_inter_nearest():
    generator = torch.Generator().manual_seed(0)
    mask = torch.rand(2, 384, 384, generator=generator) > 0.5
    # 34x68, 106x123 and 130x141 are sizes where torch's mode="nearest" picks other pixels
    for height, width in [(240, 320), (300, 200), (34, 68), (106, 123), (130, 141), (1000, 1500), (7, 5), (384, 384)]:
        resized = resize_mask_nearest(mask, (height, width))
        assert resized.dtype == torch.bool and resized.shape == (2, height, width)
        for b in range(2):
            expected = cv2.resize(mask[b].numpy().astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
            assert np.array_equal(resized[b].numpy(), expected.astype(bool)), (height, width)
    non_square = torch.rand(50, 70, generator=generator) > 0.5
    expected = cv2.resize(non_square.numpy().astype(np.uint8), (33, 91), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(resize_mask_nearest(non_square, (91, 33)).numpy(), expected.astype(bool))
    with pytest.raises(InputError, match="size"):
        resize_mask_nearest(mask, (0, 10))


@pytest.mark.gpu
def test_postprocessing_on_cuda_matches_cpu(fixture_outputs):
    logits = masks_384(fixture_outputs["final.pred_masks_stride4"])
    scores = refer_scores(fixture_outputs["final.pred_refer_logits"])
    cpu = deris_answer_mask(logits, scores, SCORE_THRESHOLD)
    gpu_scores = refer_scores(fixture_outputs["final.pred_refer_logits"].cuda())
    gpu = deris_answer_mask(logits.cuda(), gpu_scores, SCORE_THRESHOLD)
    assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    resized = resize_mask_nearest(gpu[0], (240, 320))
    assert resized.is_cuda and torch.equal(resized.cpu(), fixture_outputs["final.global_mask_original.b0"].bool())


# ---------------------------------------------------------------- image inputs: modes, sources, broken files


def random_array(shape, high=256, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, high, shape, dtype=dtype)


def grey_to_rgb(grey):
    return np.repeat(grey[..., None], 3, axis=2)


def raises_one_line(source, *fragments):
    """load_image(source) must raise a one-line InputError containing every fragment."""
    with pytest.raises(InputError) as excinfo:
        load_image(source)
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def png_mode_cases():
    """(name, PIL image as written to the file, expected uint8 RGB) for every PNG mode users meet."""
    grey = random_array((9, 11), seed=1)
    rgb = random_array((9, 11, 3), seed=2)
    alpha = random_array((9, 11), seed=3)
    alpha[0, :] = 0  # fully transparent pixels must keep their colour (alpha dropped, not blended)
    palette = random_array((16, 3), seed=4)
    indices = random_array((9, 11), high=16, seed=5)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.ravel().tolist())
    with_transparency = paletted.copy()
    with_transparency.info["transparency"] = bytes(range(0, 256, 16))  # per-entry alpha (a tRNS chunk)
    with_one_transparent = paletted.copy()
    with_one_transparent.info["transparency"] = 3
    bits = random_array((9, 11), high=2, seed=6).astype(bool)
    grey16 = random_array((9, 11), high=65536, dtype=np.uint16, seed=7)
    grey16[0, :4] = [255, 256, 65535, 383]  # values where clipping or rounding would differ from >> 8
    return [
        ("L", Image.fromarray(grey, "L"), grey_to_rgb(grey)),
        ("LA", Image.fromarray(np.stack([grey, alpha], -1), "LA"), grey_to_rgb(grey)),
        ("RGBA", Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), rgb),
        ("P", paletted, palette[indices]),
        ("P+tRNS bytes", with_transparency, palette[indices]),
        ("P+tRNS index", with_one_transparent, palette[indices]),
        ("1", Image.fromarray(bits), grey_to_rgb(bits.astype(np.uint8) * 255)),
        ("I;16", Image.fromarray(grey16), grey_to_rgb((grey16 >> 8).astype(np.uint8))),
    ]


@pytest.mark.parametrize("case", range(len(png_mode_cases())), ids=[c[0] for c in png_mode_cases()])
def test_png_modes_from_path_and_pil_give_expected_rgb(tmp_path, case):
    name, image, expected = png_mode_cases()[case]
    path = tmp_path / "mode.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == image.mode  # the file really holds this mode
        assert reopened.info.get("transparency") == image.info.get("transparency")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. Pillow's warning for a palette with transparency -> RGB
            loaded_all = (load_image(path), load_image(reopened), load_image(image))
    for loaded in loaded_all:
        assert loaded.dtype == np.uint8 and loaded.shape == expected.shape and loaded.flags["C_CONTIGUOUS"]
        assert np.array_equal(loaded, expected), name


def test_16_bit_files_scale_like_opencv(tmp_path):
    rgb16 = random_array((6, 7, 3), high=65536, dtype=np.uint16, seed=8)
    rgb16[0, 0] = [255, 256, 65535]
    path = tmp_path / "rgb16.png"
    assert cv2.imwrite(str(path), np.ascontiguousarray(rgb16[..., ::-1]))
    expected = (rgb16 >> 8).astype(np.uint8)
    assert np.array_equal(load_image(path), expected)
    with Image.open(path) as reopened:  # Pillow opens 16-bit RGB as 8-bit RGB itself
        assert np.array_equal(load_image(reopened), expected)
    grey16 = random_array((6, 7), high=65536, dtype=np.uint16, seed=9)
    as_mode_i = Image.fromarray(grey16.astype(np.int32))  # mode I, as older Pillow opens 16-bit grey PNGs
    assert as_mode_i.mode == "I"
    assert np.array_equal(load_image(as_mode_i), grey_to_rgb((grey16 >> 8).astype(np.uint8)))
    raises_one_line(Image.fromarray(np.array([[0, 70000]], np.int32)), "mode I", "[0, 70000]")


def test_cmyk_jpeg_from_path_and_pil(tmp_path):
    colours_cmyk = [(0, 255, 255, 0), (255, 0, 255, 0), (0, 0, 0, 0), (0, 0, 0, 128)]
    colours_rgb = np.array([(255, 0, 0), (0, 255, 0), (255, 255, 255), (127, 127, 127)])
    cmyk = np.zeros((16, 16, 4), np.uint8)
    for k, colour in enumerate(colours_cmyk):  # four flat 8x8 blocks: JPEG keeps them almost exactly
        cmyk[8 * (k // 2) : 8 * (k // 2) + 8, 8 * (k % 2) : 8 * (k % 2) + 8] = colour
    expected = np.zeros((16, 16, 3), np.int16)
    for k, colour in enumerate(colours_rgb):
        expected[8 * (k // 2) : 8 * (k // 2) + 8, 8 * (k % 2) : 8 * (k % 2) + 8] = colour
    image = Image.fromarray(cmyk, "CMYK")
    path = tmp_path / "cmyk.jpg"
    image.save(path, quality=100)
    with Image.open(path) as reopened:
        assert reopened.mode == "CMYK"
        from_reopened = load_image(reopened)
    for loaded in (load_image(path), from_reopened):
        assert loaded.shape == (16, 16, 3)
        assert np.abs(loaded.astype(np.int16) - expected).max() <= 3
    assert np.array_equal(load_image(image), expected)


def test_grey_jpeg_and_1x1_images(tmp_path):
    grey = np.full((8, 8), 77, np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.jpg", quality=100)
    assert np.array_equal(load_image(tmp_path / "grey.jpg"), grey_to_rgb(grey))
    pixel = np.array([[[200, 30, 90]]], np.uint8)
    Image.fromarray(pixel).save(tmp_path / "pixel.png")
    Image.fromarray(pixel).save(tmp_path / "pixel.jpg", quality=100)
    tensor = torch.from_numpy(pixel).permute(2, 0, 1)
    for source in (tmp_path / "pixel.png", Image.fromarray(pixel), pixel, tensor, tensor.double() / 255):
        assert np.array_equal(load_image(source), pixel)
    from_jpeg = load_image(tmp_path / "pixel.jpg")
    assert from_jpeg.shape == (1, 1, 3) and np.abs(from_jpeg.astype(int) - pixel).max() <= 4


def test_non_ascii_file_name(tmp_path):
    rgb = random_array((5, 6, 3), seed=10)
    path = tmp_path / "schöne Straße 图像.png"
    Image.fromarray(rgb).save(path)
    assert np.array_equal(load_image(path), rgb) and np.array_equal(load_image(str(path)), rgb)


def test_decompression_bomb_limit_refuses_before_decoding(tmp_path, monkeypatch):
    assert images.MAX_IMAGE_PIXELS == 2 * Image.MAX_IMAGE_PIXELS  # Pillow's default error threshold
    rgb = random_array((10, 20, 3), seed=11)
    path = tmp_path / "big.png"
    Image.fromarray(rgb).save(path)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 200)
    assert np.array_equal(load_image(path), rgb)  # 200 pixels: at the limit, allowed
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 199)

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded an image above the limit")

    monkeypatch.setattr(cv2, "imdecode", must_not_decode)
    raises_one_line(path, "big.png", "20x10", "200 pixels", "199 pixels", "downscale")
    assert np.array_equal(load_image(rgb), rgb)  # arrays are already in memory: no limit


@pytest.mark.parametrize("pillow_limit", [150, 50])  # Pillow would warn (above 150) / refuse (above 2 x 50)
def test_only_our_pixel_limit_applies_and_pillow_says_nothing(tmp_path, monkeypatch, pillow_limit):
    rgb = random_array((10, 20, 3), seed=11)
    path = tmp_path / "big.png"
    Image.fromarray(rgb).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert np.array_equal(load_image(path), rgb)
        monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 199)
        raises_one_line(path, "big.png", "20x10", "above the decompression-bomb limit of 199 pixels", "downscale")
    assert [str(w.message) for w in caught] == []  # no "could be decompression bomb DOS attack" from Pillow


def jpeg_bytes(rgb, **options):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def test_truncated_jpeg_refused(tmp_path):
    rgb = random_array((32, 24, 3), seed=12)
    baseline = jpeg_bytes(rgb, quality=90)
    thumbnail = jpeg_bytes(rgb[::4, ::4], quality=50)
    app1 = b"\xff\xe1" + (2 + 6 + len(thumbnail)).to_bytes(2, "big") + b"Thumb\x00" + thumbnail
    with_thumbnail = baseline[:2] + app1 + baseline[2:]  # a complete JPEG (with its own FF D9) before the main one
    progressive = jpeg_bytes(rgb, quality=90, progressive=True)
    path = tmp_path / "photo.jpg"
    for data in (baseline, with_thumbnail, progressive, baseline + b"trailing bytes"):
        path.write_bytes(data)
        assert load_image(path).shape == (32, 24, 3)
    assert np.array_equal(load_image(path), cv2.imdecode(np.frombuffer(baseline, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
    for data in (baseline, with_thumbnail, progressive):
        sos = data.rindex(b"\xff\xda") if data is not progressive else data.index(b"\xff\xda")
        for cut in (len(data) - 2, (sos + len(data)) // 2, sos + 20, len(data) // 3):
            path.write_bytes(data[:cut])
            raises_one_line(path, "photo.jpg", "is truncated (the JPEG data")
    with Image.open(path) as truncated:  # Pillow refuses to decode it too (unless LOAD_TRUNCATED_IMAGES)
        raises_one_line(truncated, "cannot read the PIL image", "truncated")


def test_truncated_png_refused(tmp_path):
    rgb = random_array((32, 24, 3), seed=13)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    data = buffer.getvalue()
    path = tmp_path / "figure.png"
    for cut in (len(data) - 12, len(data) - 20, len(data) // 2, 40):  # no IEND / inside IDAT / inside IHDR
        path.write_bytes(data[:cut])
        raises_one_line(path, "figure.png", "is truncated (the PNG data")
    path.write_bytes(data + b"trailing bytes")
    assert np.array_equal(load_image(path), rgb)


def test_a_png_signature_then_garbage_is_not_called_truncated(tmp_path):
    path = tmp_path / "garbage.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    message = raises_one_line(path, "garbage.png", "is not a valid PNG")
    assert "truncated" not in message
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\x0dIDAT" + bytes(40))  # chunks, but not IHDR first
    raises_one_line(path, "garbage.png", "is not a valid PNG")


def test_a_few_bytes_are_not_an_image_whatever_plugin_tests_them(tmp_path):
    path = tmp_path / "tiny.png"
    for data in (b"\x89P\xff", b"BM", b"\xff\xd8"):  # shorter than some Pillow plugins' format tests read
        path.write_bytes(data)
        raises_one_line(path, "tiny.png", "not an image format")


def test_a_url_is_not_fetched_and_says_so():
    message = raises_one_line("https://example.com/x.png", "'https://example.com/x.png'", "URL", "not fetched")
    assert "not found" not in message


def test_unreadable_files_refused_with_their_name(tmp_path):
    raises_one_line(tmp_path / "missing.jpg", "missing.jpg", "not found")
    raises_one_line(tmp_path, str(tmp_path), "is a directory")
    raises_one_line("", "empty")
    (tmp_path / "zero.jpg").write_bytes(b"")
    raises_one_line(tmp_path / "zero.jpg", "zero.jpg", "empty (0 bytes)")
    (tmp_path / "text.jpg").write_text("this is not an image\nsecond line\n")
    raises_one_line(tmp_path / "text.jpg", "text.jpg", "not an image format")
    icon = tmp_path / "icon.png"  # an ICO file under a .png name: Pillow reads it, OpenCV does not
    Image.fromarray(random_array((16, 16, 3), seed=14)).save(icon, format="ICO", sizes=[(16, 16)])
    raises_one_line(icon, "icon.png", "ICO", "Image.open(path)")
    with Image.open(icon) as reopened:
        assert load_image(reopened).shape == (16, 16, 3)


def test_torch_chw_tensors_equal_numpy_input():
    rgb = random_array((7, 5, 3), seed=15)
    rgb[0, 0], rgb[0, 1] = 0, 255
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    assert np.array_equal(load_image(chw), load_image(rgb))
    assert np.array_equal(load_image(chw.contiguous()), rgb)
    every_value = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16).expand(3, -1, -1)
    for dtype in (torch.float16, torch.float32, torch.float64):
        assert np.array_equal(load_image(chw.to(dtype) / 255), rgb), dtype
        assert np.array_equal(load_image(every_value.to(dtype) / 255), load_image(every_value)), dtype
    with_grad = (chw.float() / 255).requires_grad_()
    assert np.array_equal(load_image(with_grad), rgb)
    overshoot = torch.tensor([-0.02, 0.2, 1.03]).reshape(3, 1, 1)  # e.g. bicubic resampling overshoot: clipped
    assert load_image(overshoot).ravel().tolist() == [0, 51, 255]
    loaded = load_image(chw.float() / 255)
    assert loaded.dtype == np.uint8 and loaded.flags["C_CONTIGUOUS"]


def test_rejected_sources_say_what_was_expected_and_found():
    chw = torch.zeros(3, 4, 5, dtype=torch.uint8)
    raises_one_line(None, "expected a file path", "torch tensor [3, H, W]", "got NoneType")
    raises_one_line([[0, 0, 0]], "got list")
    raises_one_line(b"\x89PNG", "got bytes", "Image.open(io.BytesIO(data))")
    raises_one_line(chw.permute(1, 2, 0), "got a torch.uint8 tensor of shape (4, 5, 3)", "permute(2, 0, 1)")
    raises_one_line(chw[None], "shape (1, 3, 4, 5)", "tensor[0]")
    raises_one_line(torch.zeros(3, 0, 5), "shape (3, 0, 5)")
    raises_one_line(chw.long(), "torch.int64", "to(torch.uint8)")
    raises_one_line(chw.bool(), "torch.bool")
    zero_to_255 = torch.linspace(0, 255, 60).reshape(3, 4, 5)
    raises_one_line(zero_to_255, "[0, 1]", "found values in [0, 255]", "divide by 255")
    raises_one_line(zero_to_255 / 255 * 4.5 - 2.1, "[0, 1]", "found values in [-2.1, 2.4]", "normalised")
    raises_one_line(torch.full((3, 2, 2), float("nan")), "NaN")
    raises_one_line(np.zeros((4, 5, 3), bool), "bool array of shape (4, 5, 3)")
    raises_one_line(np.zeros((4, 5, 4), np.uint8), "shape (4, 5, 4)", "array[..., :3]")
    raises_one_line(np.zeros((4, 5), np.uint8), "shape (4, 5)", "grey")
    raises_one_line(np.zeros((4, 5, 3), np.float32), "float32", "uint8")
    raises_one_line(Image.fromarray(np.zeros((4, 5), np.float32)), "mode F")
    raises_one_line(Image.new("RGB", (0, 3)), "empty", "0x3")
    raises_one_line(Image.new("La", (2, 2)), "cannot read the PIL image", "mode La")  # Pillow cannot convert it


@pytest.mark.gpu
def test_torch_tensor_on_cuda_equals_numpy_input():
    rgb = random_array((7, 5, 3), seed=16)
    chw = torch.from_numpy(rgb).permute(2, 0, 1).cuda()
    assert np.array_equal(load_image(chw), rgb)
    assert np.array_equal(load_image(chw.half() / 255), rgb)
