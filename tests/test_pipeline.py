"""The Python API on a test-sized model: what a user gets, and that it equals the stages run by hand."""
import json
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from deris_rerank import Pipeline
from deris_rerank.candidates import Candidates
from deris_rerank.errors import CheckpointError, InputError
from deris_rerank.candidates import deris_answer_mask
from deris_rerank.images import load_image
from deris_rerank.transforms import prepare_images, resize_mask_nearest
from deris_rerank.rle import decode_mask


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu", tau=0.0)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 200x300 (HxW) JPEG with some structure, and a second image."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    image = cv2.GaussianBlur(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), (9, 9), 3)
    cv2.rectangle(image, (40, 50), (120, 170), (30, 200, 40), -1)
    cv2.imwrite(str(root / "a.jpg"), image)
    cv2.imwrite(str(root / "b.png"), np.ascontiguousarray(image[::-1, ::2]))
    return root / "a.jpg", root / "b.png"


def run_by_hand(pipe, image_path, text):
    """The stages, called one by one: what the pipeline must reproduce."""
    rgb = load_image(image_path)
    hi, lo = prepare_images(rgb, 384, 224)
    tokens, padding = pipe.tokenizer.encode(text, pipe.config.max_tokens)
    with torch.inference_mode():
        out = pipe.model(hi[None], lo[None], tokens[None], padding[None])
        cands = Candidates.from_outputs(out)
        decision = pipe.gate.decide(cands.query_embed, cands.scores, *cands.gate_features())
    slot = int(decision.selected[0])
    mask = resize_mask_nearest(out["mask_logits"][0, slot].sigmoid() >= 0.5, rgb.shape[:2]).numpy()
    answer = deris_answer_mask(out["mask_logits"], out["scores"], pipe.config.score_threshold)[0]
    return out, decision, mask, resize_mask_nearest(answer, rgb.shape[:2]).numpy()


def test_single_pair_equals_the_stages_run_by_hand(pipe, photo):
    result = pipe(photo[0], "man on the left")
    out, decision, mask, answer = run_by_hand(pipe, photo[0], "man on the left")
    assert result.mask.shape == (200, 300) and result.mask.dtype == bool
    assert np.array_equal(result.mask, mask) and np.array_equal(result.deris_mask, answer)
    assert result.deris_mask.any()  # DeRIS's own answer is not empty: the comparison above shows something
    assert result.selected_slot == int(decision.selected[0]) and result.default_index == int(decision.default_index[0])
    assert result.switched == bool(decision.switched[0])
    assert result.p_fail == pytest.approx(float(decision.p_fail[0]))
    assert result.scores == sorted(result.scores, reverse=True)
    assert sorted(result.slots) == list(range(10))
    assert result.scores[0] == pytest.approx(float(out["scores"][0].max()))
    assert 0 <= result.existence <= 1


def test_gate_switches_and_keeps(tiny_model_dir, photo):
    eager = Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu", tau=0.0)
    never = Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu", tau=1.0)
    texts = ["man on the left", "the red car", "top right square", "the biggest circle"]
    switched = [r.switched for r in eager(photo[0], texts)]
    assert any(switched)  # tau 0 with a random gate: some alternative is predicted better
    kept = never(photo[0], texts)
    assert not any(r.switched for r in kept) and all(r.selected_rank == 0 for r in kept)
    for r in kept:
        assert np.array_equal(r.mask, r.default_mask)


def test_many_texts_reuse_the_image_and_match_single_calls(pipe, photo, monkeypatch):
    texts = ["man on the left", "the red car", "small dog next to the blue bag"]
    singles = [pipe(photo[0], t) for t in texts]
    calls = []
    original = pipe.model.encode_image
    monkeypatch.setattr(pipe.model, "encode_image", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    together = pipe(photo[0], texts)
    assert calls == [1]  # one image through Swin + pixel decoder, for three texts
    for one, many in zip(singles, together):
        assert np.array_equal(one.mask, many.mask) and one.selected_rank == many.selected_rank
        assert np.allclose(one.scores, many.scores, atol=1e-5)


def test_batch_groups_by_image_and_keeps_order(pipe, photo, monkeypatch):
    pairs = [(photo[0], "man on the left"), (photo[1], "the red car"), (photo[0], "top right square"), (photo[1], "the biggest circle")]
    expected = [pipe(image, text) for image, text in pairs]
    calls = []
    original = pipe.model.encode_image
    monkeypatch.setattr(pipe.model, "encode_image", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    results = pipe.batch(pairs, batch_size=4)
    assert calls == [2]  # both images encoded once, together
    assert [r.text for r in results] == [t for _, t in pairs]
    for want, got in zip(expected, results):
        assert want.selected_rank == got.selected_rank and np.allclose(want.scores, got.scores, rtol=0, atol=1e-5)
    # The same candidates alone and in a batch of 4. Per-sample semantics make them equal in
    # exact arithmetic (float64: bit-identical); in float32 a batched matmul sums in another
    # order, so logits differ in the last bits (~1e-6), and a pixel within that of the
    # threshold may binarise differently: compare logits, not masks.
    (batched,) = list(pipe.iter_candidates(pairs, batch_size=4))
    for row, index in enumerate(batched.indices):
        (alone,) = list(pipe.iter_candidates([pairs[index]]))
        assert torch.allclose(batched.candidates.mask_logits[row], alone.candidates.mask_logits[0], rtol=0, atol=1e-4)


def test_every_image_type_gives_the_same_answer(pipe, photo):
    rgb = load_image(photo[0])
    inputs = [photo[0], str(photo[0]), Image.open(photo[0]), rgb, torch.from_numpy(rgb).permute(2, 0, 1)]
    masks = [pipe(image, "the red car").mask for image in inputs]
    for mask in masks[1:]:
        assert np.array_equal(mask, masks[0])


def test_exif_rotated_photo_comes_back_in_displayed_orientation(pipe, tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 100, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    image.save(tmp_path / "rotated.jpg", exif=exif)
    result = pipe(tmp_path / "rotated.jpg", "the red car")
    assert result.mask.shape == (100, 60)


def test_bad_pairs_are_reported_and_the_rest_go_on(pipe, photo, tmp_path):
    (tmp_path / "broken.jpg").write_text("not an image")
    pairs = [(photo[0], "the red car"), (tmp_path / "broken.jpg", "the red car"), (photo[0], "   "), (tmp_path / "missing.png", "x"), (photo[1], "the red car")]
    outcomes = dict(pipe.iter_batch(pairs, batch_size=2))
    assert sorted(outcomes) == [0, 1, 2, 3, 4]
    assert isinstance(outcomes[1], InputError) and "broken.jpg" in str(outcomes[1])
    assert isinstance(outcomes[2], InputError) and "empty" in str(outcomes[2])
    assert isinstance(outcomes[3], InputError) and "missing.png" in str(outcomes[3])
    assert outcomes[0].mask.shape == (200, 300) and outcomes[4].mask.shape == (200, 150)
    with pytest.raises(InputError, match="empty"):
        pipe(photo[0], "")
    with pytest.raises(InputError, match="expected"):
        pipe(np.zeros((10, 10), dtype=np.uint8), "the red car")


def test_over_long_text_is_truncated_with_a_warning(pipe, photo):
    with pytest.warns(UserWarning, match="truncat"):
        result = pipe(photo[0], " ".join(["the red car on the left"] * 20))
    assert result.mask.shape == (200, 300)


def test_json_and_save(pipe, photo, tmp_path):
    result = pipe(photo[0], "man on the left")
    data = json.loads(json.dumps(result.to_json()))
    assert np.array_equal(decode_mask(data["mask"]), result.mask)
    assert np.array_equal(decode_mask(data["deris_mask"]), result.deris_mask)
    assert data["selected"] == result.selected_rank and data["scores"] == result.scores
    assert set(data["timings_ms"]) >= {"load", "swin", "pixel_decoder", "beit3", "decoder", "signatures", "gate"}
    assert all(v >= 0 for v in data["timings_ms"].values())
    written = result.save(tmp_path / "out", candidates=True)
    mask_png = cv2.imread(str(written["mask"]), cv2.IMREAD_GRAYSCALE)
    assert np.array_equal(mask_png > 127, result.mask)
    assert cv2.imread(str(written["overlay"])).shape == (200, 300, 3)
    assert written["candidates"].is_file() and json.loads(written["json"].read_text())["text"] == "man on the left"


def test_candidates_are_lazy_and_consistent(pipe, photo):
    result = pipe(photo[0], "man on the left")
    assert callable(result._candidate_masks)
    candidates = result.candidates
    assert candidates.shape == (10, 200, 300) and candidates.dtype == bool
    assert np.array_equal(candidates[result.selected_rank], result.mask)
    assert np.array_equal(candidates[0], result.default_mask)


def test_missing_files_and_wrong_gates_are_clear_errors(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("deris_rerank.model_files.DEFAULT_MODEL", tmp_path / "no-default")
    with pytest.raises(CheckpointError, match="default model is missing.*deris=PATH"):
        Pipeline()
    with pytest.raises(CheckpointError, match="nowhere.pth"):
        Pipeline(deris=tmp_path / "nowhere.pth")
    with pytest.raises(CheckpointError, match="no weights for preset deris-l-refcoco"):
        Pipeline(deris="deris-l-refcoco")
    with pytest.raises(CheckpointError, match="tok.spm"):
        Pipeline(deris=tiny_model_dir / "deris", tokenizer=tmp_path / "tok.spm", gate=False, device="cpu")
    from deris_rerank.rerank.decision import DecisionRule
    from deris_rerank.rerank.venice import RELEASED, GateConfig, ReleasedGate
    from deris_rerank.rerank.files import save_gate

    save_gate(ReleasedGate(GateConfig(RELEASED, query_dim=256, hidden_dim=32, n_layers=1, n_heads=4), DecisionRule(0.5)), tmp_path / "big")
    with pytest.raises(CheckpointError, match="size 256.*produces 64"):
        Pipeline(deris=tiny_model_dir / "deris", gate=tmp_path / "big.safetensors", device="cpu")


def test_without_a_gate_the_answer_is_query_0(tiny_model_dir, photo, monkeypatch):
    monkeypatch.setenv("DERIS_RERANK_WEIGHTS", str(tiny_model_dir / "empty"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = Pipeline(deris=tiny_model_dir / "deris", device="cpu")
    assert plain.gate is None and any("no Venice-H1 gate" in str(w.message) for w in caught)
    result = plain(photo[0], "man on the left")
    assert result.p_fail is None and not result.switched and result.selected_rank == 0
    assert np.array_equal(result.mask, result.default_mask)


def test_bfloat16_runs_on_cpu_close_to_float32_and_float16_needs_cuda(tiny_model_dir, photo, pipe):
    fast = Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu", dtype="bfloat16")
    assert fast.autocast_dtype == torch.bfloat16
    want, got = pipe(photo[0], "the red car"), fast(photo[0], "the red car")
    assert got.mask.shape == want.mask.shape and got.mask.dtype == bool
    assert np.allclose(got.scores, want.scores, rtol=0, atol=0.05)  # bfloat16 keeps 8 bits of mantissa
    assert (got.deris_mask != want.deris_mask).mean() < 0.05
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="float16 runs as CUDA autocast"):
            Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu", dtype="float16")


def test_bfloat16_weights_are_stored_once_with_the_same_results(tiny_model_dir, photo):
    """The fast mode rounds linear/conv weights once at load: bit-identical to autocast rounding
    them on every call (a built float32 model, used as given), and the other parameters stay float32."""
    from deris_rerank.checkpoints import load_deris

    stored = Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu", dtype="bfloat16")
    as_given = Pipeline(deris=load_deris(tiny_model_dir / "deris"), tokenizer=stored.tokenizer,
                        gate=tiny_model_dir / "gate.safetensors", device="cpu", dtype="bfloat16")
    linears = [m for m in stored.model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    norms = [m for m in stored.model.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.Embedding))]
    assert linears and norms
    assert all(p.dtype == torch.bfloat16 for m in linears for p in m.parameters())
    assert all(p.dtype == torch.float32 for m in norms for p in m.parameters())
    assert all(p.dtype == torch.float32 for p in as_given.model.parameters())  # a built model is not changed
    for text in ("the red car", "man on the left"):
        want, got = as_given(photo[0], text), stored(photo[0], text)
        assert got.scores == want.scores and got.slots == want.slots and got.p_fail == want.p_fail
        assert np.array_equal(got.mask, want.mask) and np.array_equal(got.deris_mask, want.deris_mask)


@pytest.mark.gpu
def test_cuda_matches_cpu(tiny_model_dir, photo, pipe):
    gpu = Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cuda", tau=0.0)
    cpu_result, gpu_result = pipe(photo[0], "the red car"), gpu(photo[0], "the red car")
    assert np.allclose(cpu_result.scores, gpu_result.scores, atol=1e-4)
    assert (cpu_result.mask != gpu_result.mask).mean() < 1e-3
    half = Pipeline(deris=tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cuda", dtype="bfloat16")
    assert half(photo[0], "the red car").mask.shape == (200, 300)


def test_non_ascii_and_emoji_text(pipe, photo):
    result = pipe(photo[0], "hé à 🐶 左")
    assert result.mask.shape == (200, 300) and len(result.scores) == 10
    ids, _ = pipe.tokenizer.encode("🐶", pipe.config.max_tokens)
    assert 3 in ids.tolist()  # unknown to the tokenizer: <unk>
    with pytest.raises(InputError):
        pipe(photo[0], "?!.,")  # nothing left after upstream's cleaning


def test_an_encoded_image_gives_the_same_results_without_encoding_again(pipe, photo, monkeypatch):
    from deris_rerank import EncodedImage

    texts = ["man on the left", "the red car", "top right square"]
    expected_one = pipe(photo[0], texts[0])
    expected_many = pipe(photo[0], texts)
    encoded = pipe.encode(photo[0])
    assert isinstance(encoded, EncodedImage) and encoded.size == expected_one.image_size
    assert set(encoded.timings) >= {"load", "swin", "pixel_decoder"}
    calls = []
    original = pipe.model.encode_image
    monkeypatch.setattr(pipe.model, "encode_image", lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k))
    one = pipe(encoded, texts[0])
    many = pipe(encoded, texts)
    assert calls == []  # Swin and the pixel decoder did not run again
    for want, got in [(expected_one, one), *zip(expected_many, many)]:
        assert np.array_equal(want.mask, got.mask) and np.array_equal(want.deris_mask, got.deris_mask)
        assert want.scores == got.scores and want.selected_rank == got.selected_rank and want.p_fail == got.p_fail
    # mixed with a plain image in one batch: only the plain one is encoded
    mixed = pipe.batch([(encoded, texts[1]), (photo[1], texts[1])], batch_size=2)
    assert calls == [1] and np.allclose(mixed[0].scores, expected_many[1].scores, rtol=0, atol=1e-5)
    with pytest.raises(InputError):
        pipe.encode(photo[0].parent / "missing.png")


def test_a_pipeline_from_built_objects_equals_one_from_files(tiny_model_dir, photo):
    from deris_rerank.checkpoints import load_deris
    from deris_rerank.rerank.files import load_gate
    from deris_rerank.tokenizer import Beit3Tokenizer
    from deris_rerank.run_identity import pipeline_identity

    files = Pipeline.from_files(tiny_model_dir / "deris", gate=tiny_model_dir / "gate.safetensors", device="cpu")
    built = Pipeline(load_deris(tiny_model_dir / "deris"), gate=load_gate(tiny_model_dir / "gate.safetensors"),
                     tokenizer=Beit3Tokenizer(tiny_model_dir / "deris" / "beit3.spm"), device="cpu", tau=0.0)
    assert built.deris_path is None and built.gate.rule.tau == 0.0
    want = files(photo[0], "man on the left")
    got = built(photo[0], "man on the left")
    assert got.scores == want.scores and got.p_fail == want.p_fail and np.array_equal(got.default_mask, want.default_mask)
    assert pipeline_identity(built)["tokenizer_sha256"] == pipeline_identity(files)["tokenizer_sha256"]
    assert len(pipeline_identity(built)["model"]["sha256"]) == 64
    with pytest.raises(InputError, match="must be a path"):
        Pipeline.from_files(load_deris(tiny_model_dir / "deris"))
