"""The contract: the downsized upstream fixture reproduced from its weights and inputs.

Tolerances: <= 1e-10 max-abs on tensors the fixture stores in float64; tensors stored in
float32 only allow their storage rounding (relative 2^-24, plus a tiny absolute floor).
"""
import pytest
import torch

from deris_rerank.checkpoints import load_deris
from deris_rerank.deris.model import upsample_masks
from deris_rerank.candidates import deris_answer_mask

FLOAT64_TOL = 1e-10


def assert_float64_close(ours, ref, name):
    err = (ours.double() - ref).abs().max().item()
    assert err <= FLOAT64_TOL, f"{name}: max abs error {err:.3e}"


def assert_float32_rounding(ours, ref, name):
    """`ref` is float32 storage of a float64 quantity: allow only that rounding."""
    ref = ref.double()
    bound = 2.0**-24 * ref.abs() + 1e-12
    excess = ((ours.double() - ref).abs() - bound).max().item()
    assert excess <= 0, f"{name}: error exceeds float32 storage rounding by {excess:.3e}"


@pytest.fixture(scope="module")
def model(parity_state, parity_config):
    """The fixture's DeRIS, float64. load_deris assigns parity_state's tensors to its parameters:
    casting the model (model.to) replaces them, but nothing may change them in place."""
    return load_deris(parity_state, parity_config)


def run(model, inputs, semantics, dtype=torch.float64):
    with torch.inference_mode():
        return model.to(dtype)(
            inputs["img"].to(dtype),
            inputs["img_mini"].to(dtype),
            inputs["ref_expr_inds"],
            inputs["text_attention_mask"],
            batch_semantics=semantics,
            return_rounds=True,
        )


@pytest.fixture(scope="module")
def upstream_run(model, parity_inputs):
    return run(model, parity_inputs, "upstream")


@pytest.fixture(scope="module")
def per_sample_run(model, parity_inputs):
    return run(model, parity_inputs, "per_sample")


FINALS = {
    "mask_logits_stride4": "pred_masks_stride4",
    "refer_logits": "pred_refer_logits",
    "scores": "refer_score",
    "boxes": "pred_boxes_cxcywh",
    "existence_logit": "pred_existence_logit",
    "query_embed": "perception_query_feat",
    "cognition_embed": "cognition_query_feat",
}


def test_upstream_batch_semantics_reproduce_final_outputs(parity_outputs, upstream_run):
    expected = parity_outputs
    for ours, theirs in FINALS.items():
        assert_float64_close(upstream_run[ours], expected[f"final.{theirs}"], ours)
    top = expected["final.pred_masks_384_top1_query_index"]
    assert torch.equal(upstream_run["scores"].argmax(dim=1), top)
    top_masks = upstream_run["mask_logits"][torch.arange(2), top]
    assert torch.equal(top_masks.float(), expected["final.pred_masks_384_top1"])  # computed in float32 upstream
    union = deris_answer_mask(upstream_run["mask_logits"], upstream_run["scores"], 0.9)
    assert torch.equal(union, expected["final.global_mask_384"].bool())


def test_per_sample_semantics_reproduce_batch_size_one_outputs(parity_outputs, per_sample_run, upstream_run):
    expected = parity_outputs
    for ours, theirs in FINALS.items():
        assert_float64_close(per_sample_run[ours], expected[f"bs1.{theirs}"], ours)
    union = deris_answer_mask(per_sample_run["mask_logits"], per_sample_run["scores"], 0.9)
    assert torch.equal(union, expected["bs1.global_mask_384"].bool())
    # the two semantics really differ on this batch, so the test above can fail
    assert (per_sample_run["refer_logits"] - upstream_run["refer_logits"]).abs().max() > 1e-3


def test_every_loopback_round_and_decoder_sublayer(parity_outputs, upstream_run):
    expected = parity_outputs
    rounds = upstream_run["rounds"]
    assert len(rounds) == 4
    names = {
        "query_before_loopback": "query_before_loopback",
        "query_after_query_SA": "query_after_query_SA",
        "query_refer": "query_refer_Q2TCA",
        "query": "query_after_loopback",
        "refer_logits": "refer_logits",
        "boxes": "pred_boxes_cxcywh",
    }
    for r, state in enumerate(rounds):
        for ours, theirs in names.items():
            assert_float64_close(state[ours], expected[f"round{r}.{theirs}"], f"round {r} {ours}")
        assert torch.equal(state["attn_mask"], expected[f"round{r}.attn_mask_for_next_layer"].bool()), r
        if r < 3:
            assert_float32_rounding(state["mask_logits_stride4"], expected[f"round{r}.pred_masks_stride4"], f"round {r} masks")
    for layer in range(3):
        state = rounds[layer + 1]
        assert_float64_close(state["after_cross_attn"], expected[f"decoder_layer{layer}.after_cross_attn"], "cross")
        assert_float64_close(state["after_self_attn"], expected[f"decoder_layer{layer}.after_self_attn"], "self")
        assert_float64_close(state["query_before_loopback"], expected[f"decoder_layer{layer}.after_ffn"], "ffn")


def test_cognition_branch_tensors(parity_outputs, upstream_run):
    expected = parity_outputs
    tokens = upstream_run["beit3_tokens"]
    assert_float64_close(tokens[:, 0], expected["beit3.cls_token"], "cls")
    assert_float64_close(tokens[:, 1:197], expected["beit3.img_tokens"], "image tokens")
    assert_float64_close(tokens[:, 197:], expected["beit3.text_tokens"], "text tokens")
    assert_float64_close(upstream_run["img_feat"], expected["understanding.img_feat"], "img_feat")
    assert_float64_close(upstream_run["text_feat"], expected["understanding.text_feat"], "text_feat")
    assert_float64_close(upstream_run["initial_queries"], expected["understanding.init_query_feat"], "queries")


def test_perception_features(model, parity_inputs, parity_outputs):
    inputs, expected = parity_inputs, parity_outputs
    with torch.inference_mode():
        model.double()
        features = model.swin(inputs["img"][:1].double())
        image = model.pixel_decoder(features)
    for level, name in enumerate(["res2", "res3", "res4", "res5"]):
        assert_float32_rounding(features[level], expected[f"swin.{name}.b0"], name)
    assert_float32_rounding(image[0], expected["pixel_decoder.mask_features.b0"], "mask_features")
    for level in range(3):
        assert_float32_rounding(image[1][level], expected[f"pixel_decoder.multi_scale_features.{level}"][:1], level)


def test_mask_logits_are_upstreams_float32_upsample(upstream_run):
    stride4 = upstream_run["mask_logits_stride4"]
    assert upstream_run["mask_logits"].shape == (2, 10, 384, 384)
    assert torch.equal(upstream_run["mask_logits"], upsample_masks(stride4))
    # values are float32 numbers even in a float64 run, as upstream's .float() cast makes them
    assert torch.equal(upstream_run["mask_logits"], upstream_run["mask_logits"].float().double())


def test_float32_run_agrees_with_float64_reference(model, parity_inputs, parity_outputs, per_sample_run):
    inputs, expected = parity_inputs, parity_outputs
    out32 = run(model, inputs, "per_sample", torch.float32)
    model.double()
    for ours, theirs in FINALS.items():
        ref = expected[f"bs1.{theirs}"]
        rel = ((out32[ours].double() - ref).abs().max() / ref.abs().max()).item()
        assert rel < 1e-5, f"{ours}: float32 relative error {rel:.2e}"
    assert torch.equal(out32["scores"].argsort(dim=1, descending=True), expected["bs1.refer_score"].argsort(dim=1, descending=True))


def test_results_do_not_depend_on_the_batch(model, parity_inputs):
    inputs = parity_inputs
    both = run(model, inputs, "per_sample")
    single = run(model, {k: v[1:] for k, v in inputs.items() if k in ("img", "img_mini", "ref_expr_inds", "text_attention_mask")}, "per_sample")
    for key in FINALS:
        assert torch.allclose(both[key][1:], single[key], atol=1e-12, rtol=0), key
