"""How close the float64 model must come to upstream's parity fixture, tensor by tensor, and the
measurement these bounds come from (`python tests/parity_bounds.py`, 2.5 minutes on 2 cores).

A float64 run is not all float64: it keeps upstream's deliberate float32 casts (the BEiT-3
softmax and GELU, the bilinear FPN upsample, the attention-mask downsample and the 384 px mask
upsample, the sine positions; see UPSTREAM_FACTS.md section 7). torch's float32 kernels are not
the same code on every CPU: which one runs depends on the instruction set (`ATEN_CPU_CAPABILITY`
forces one). Replaying every float32 op of a float64 fixture run on the same inputs under each
capability (torch 2.13.0, AMD EPYC with AVX-512) gave, against the native AVX512 kernels:

    op                          AVX2                          DEFAULT
    softmax (BEiT-3, 217 keys)  <= 3.3 ulp of each element    <= 4.2 ulp of each element
    bilinear interpolation      identical                     <= 1.4 ulp of the map's largest input
    GELU, sin, cos, pow, + - * /  identical                   identical

(ulp = 2^-23 relative.) So a tensor computed after a softmax or an upsample can differ from the
fixture, recorded on another machine, by more than float64 noise, and a fixed 1e-10 bound holds
only on the kind of CPU the fixture was recorded on.

The model of that difference: each element of every softmax output moves by a uniform random
relative error of up to 4.5 ulp, each element of every bilinear interpolation by up to 1.5 ulp
of the largest magnitude in its input map (the largest spreads above, rounded up), and the other
float32 ops not at all (they gave the same bits under all three capabilities). `Float32KernelNoise`
applies it; the sensitivity of a tensor is the largest max-abs change it causes over 8 draws.
Each bound below is 2x the largest sensitivity in its family (rounded up); then the measured
difference to the fixture under each capability, all in max-abs over the family's tensors:

    family          sensitivity  bound     AVX512    AVX2      DEFAULT   (vs the fixture)
    beit3_tokens    6.42e-07     1.3e-06   4.3e-15   4.67e-07  4.43e-07
    queries         2.01e-07     4.1e-07   9.8e-15   6.53e-08  7.10e-08
    heads           7.25e-08     1.5e-07   3.6e-15   2.79e-08  4.26e-08
    mask_logits     3.35e-06     6.7e-06   4.75e-07  9.54e-07  1.43e-06  (*)
    mask_features   1.42e-06     2.9e-06   1.19e-07  1.19e-07  2.04e-07  (*)

(torch 2.13.0+cpu, AMD EPYC with AVX-512; `python tests/parity_bounds.py` prints this table.
(*) includes the fixture's float32 storage rounding, which the bound adds on top, elementwise.)
The real differences lie 2.7x (BEiT-3 tokens) to 14x (mask features) inside the bounds.

Tensors that no varying float32 op precedes (Swin's maps, the pixel decoder's multi-scale maps,
the learned initial queries, round 0's decoder output and boxes; round 0's query self-attention,
which the noise does not reach: sensitivity 9e-16) keep 1e-10, or float32 storage rounding where
the fixture stores float32; discrete outputs (top candidate, union mask, attention
masks) stay exact. `tests/test_deris_parity.py::test_float32_cast_points_are_upstreams` checks that
the float32 cast points are upstream's, which a value bound this size could no longer tell.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FLOAT64_TOL = 1e-10  # max-abs, where no varying float32 op comes before the tensor
FLOAT32_HALF_ULP = 2.0**-24  # relative rounding error of a float64 value stored as float32
ULP = 2.0**-23  # float32's spacing just above 1: one ulp, relative

# max-abs bounds by family (see the module docstring for the derivation)
CAST_BOUNDS = {
    "beit3_tokens": 1.3e-6,  # BEiT-3's tokens and their projections (img_feat, text_feat)
    "queries": 4.1e-7,  # decoder queries and layer states the text or the masks reach; the aligner output
    "heads": 1.5e-7,  # referring logits, scores, boxes, existence logit
    "mask_logits": 6.7e-6,  # stride-4 masks of every round and the 384 px top-1 masks
    "mask_features": 2.9e-6,  # the pixel decoder's mask features (after the float32 FPN upsample)
}

# fixture keys that no varying float32 op precedes
UNCAST = {"understanding.init_query_feat", "round0.query_before_loopback", "round0.pred_boxes_cxcywh",
          "round0.query_after_query_SA"}

# DerisOutput fields -> fixture names, for the final outputs ("final." / "bs1." prefixes) and per round
FINALS = {
    "mask_logits_stride4": "pred_masks_stride4",
    "refer_logits": "pred_refer_logits",
    "scores": "refer_score",
    "boxes": "pred_boxes_cxcywh",
    "existence_logit": "pred_existence_logit",
    "query_embed": "perception_query_feat",
    "cognition_embed": "cognition_query_feat",
}
ROUND_NAMES = {
    "query_before_loopback": "query_before_loopback",
    "query_after_query_SA": "query_after_query_SA",
    "query_refer": "query_refer_Q2TCA",
    "query": "query_after_loopback",
    "refer_logits": "refer_logits",
    "boxes": "pred_boxes_cxcywh",
}


def family(key: str) -> Optional[str]:
    """The CAST_BOUNDS family of a fixture key; None for tensors no varying float32 op precedes."""
    if key in UNCAST or key.startswith(("swin.", "pixel_decoder.multi_scale_features")):
        return None
    if key.startswith(("beit3.", "understanding.")):
        return "beit3_tokens"
    if "pred_masks" in key:
        return "mask_logits"
    if key.startswith("pixel_decoder.mask_features"):
        return "mask_features"
    if key.endswith(("refer_logits", "refer_score", "pred_boxes_cxcywh", "pred_existence_logit")):
        return "heads"
    return "queries"


def excess(ours: torch.Tensor, ref: torch.Tensor, key: str) -> float:
    """How far `ours` lies outside the bound for fixture tensor `key` (<= 0: within), in max-abs.

    The bound: FLOAT64_TOL, or the family's cast bound; plus float32 storage rounding (half an
    ulp of each stored value) where the fixture stores `key` in float32.
    """
    assert ours.shape == ref.shape, f"{key}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    name = family(key)
    allowed = FLOAT64_TOL if name is None else CAST_BOUNDS[name]
    bound = torch.full(ref.shape, allowed, dtype=torch.float64)
    if ref.dtype == torch.float32:
        bound = bound + FLOAT32_HALF_ULP * ref.double().abs()
    return ((ours.double() - ref.double()).abs() - bound).max().item()


def assert_matches_fixture(ours: torch.Tensor, ref: torch.Tensor, key: str) -> None:
    over = excess(ours, ref, key)
    assert over <= 0, f"{key}: max abs error {(ours.double() - ref.double()).abs().max().item():.3e}, {over:.3e} over its bound"


class Float32KernelNoise(TorchFunctionMode):
    """Inside it, the outputs of float32 softmax and bilinear interpolation move as torch's float32
    kernels of another CPU capability could move them (the model in the module docstring).
    Meant for float64 runs, where these are the cast points; draws from `generator`."""

    SOFTMAX_ULPS = 4.5  # relative to each element
    INTERPOLATION_ULPS = 1.5  # relative to the largest magnitude of each input map

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.generator = generator

    def _jitter(self, out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        u = torch.rand(out.shape, generator=self.generator, dtype=torch.float64) * 2 - 1
        return (out.double() + u * scale).to(out.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not (isinstance(out, torch.Tensor) and out.dtype == torch.float32):
            return out
        if func in (torch.softmax, torch.Tensor.softmax, F.softmax):
            return self._jitter(out, self.SOFTMAX_ULPS * ULP * out.double().abs())
        if func is F.interpolate:
            largest = args[0].double().abs().amax(dim=(-2, -1), keepdim=True)
            return self._jitter(out, self.INTERPOLATION_ULPS * ULP * largest)
        return out


# --------------------------------------------------------------------------------------------
# the measurement (run this file); the tests import only the definitions above


def fixture_comparisons(model, inputs, outputs) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """Every fixture tensor the parity tests compare with a bound: key -> (ours float64, reference)."""
    pairs = {}
    for semantics, prefix in (("upstream", "final"), ("per_sample", "bs1")):
        with torch.inference_mode():
            run = model(inputs["img"].double(), inputs["img_mini"].double(), inputs["ref_expr_inds"],
                        inputs["text_attention_mask"], batch_semantics=semantics, return_rounds=True)
        for ours, theirs in FINALS.items():
            pairs[f"{prefix}.{theirs}"] = run[ours]
        if semantics == "per_sample":
            continue
        top = outputs["final.pred_masks_384_top1_query_index"]
        pairs["final.pred_masks_384_top1"] = run["mask_logits"][torch.arange(len(top)), top]
        for r, state in enumerate(run["rounds"]):
            for ours, theirs in ROUND_NAMES.items():
                pairs[f"round{r}.{theirs}"] = state[ours]
            if f"round{r}.pred_masks_stride4" in outputs:
                pairs[f"round{r}.pred_masks_stride4"] = state["mask_logits_stride4"]
        for layer in range(len(run["rounds"]) - 1):
            state = run["rounds"][layer + 1]
            for ours, theirs in (("after_cross_attn", "after_cross_attn"), ("after_self_attn", "after_self_attn"),
                                 ("query_before_loopback", "after_ffn")):
                pairs[f"decoder_layer{layer}.{theirs}"] = state[ours]
        tokens = run["beit3_tokens"]
        pairs.update({"beit3.cls_token": tokens[:, 0], "beit3.img_tokens": tokens[:, 1:197],
                      "beit3.text_tokens": tokens[:, 197:], "understanding.img_feat": run["img_feat"],
                      "understanding.text_feat": run["text_feat"], "understanding.init_query_feat": run["initial_queries"]})
    with torch.inference_mode():
        features = model.swin(inputs["img"][:1].double())
        mask_features, multi_scale = model.pixel_decoder(features)
    for level, name in enumerate(["res2", "res3", "res4", "res5"]):
        pairs[f"swin.{name}.b0"] = features[level]
    pairs["pixel_decoder.mask_features.b0"] = mask_features
    for level, ours in enumerate(multi_scale):
        pairs[f"pixel_decoder.multi_scale_features.{level}"] = ours
    return {key: (ours.double().clone(), outputs[key][: len(ours)]) for key, ours in pairs.items()}


def _load_fixture(reference: Path):
    from safetensors.torch import load_file

    from conftest import config_from_fixture
    from deris_rerank.checkpoints import load_deris

    folder = reference / "parity_small_A"
    config = config_from_fixture(json.loads((folder / "config.json").read_text()))
    model = load_deris(load_file(str(folder / "state_dict.safetensors")), config).double()
    return model, load_file(str(folder / "inputs.safetensors")), load_file(str(folder / "outputs.safetensors"))


def _errors_here(reference: Path) -> Dict[str, float]:
    """Max-abs difference to the fixture of every compared tensor, under this process's capability."""
    pairs = fixture_comparisons(*_load_fixture(reference))
    return {key: (ours - ref.double()).abs().max().item() for key, (ours, ref) in pairs.items()}


def _by_family(values: Dict[str, float]) -> Dict[Optional[str], float]:
    out: Dict[Optional[str], float] = {}
    for key, value in values.items():
        out[family(key)] = max(out.get(family(key), 0.0), value)
    return out


def main() -> None:
    from conftest import REFERENCE_DIR

    if sys.argv[1:] == ["--errors-here"]:
        print(json.dumps(_errors_here(REFERENCE_DIR)))
        return
    model, inputs, outputs = _load_fixture(REFERENCE_DIR)
    base = fixture_comparisons(model, inputs, outputs)
    sensitivity = dict.fromkeys(base, 0.0)
    for draw in range(8):
        with Float32KernelNoise(torch.Generator().manual_seed(draw)):
            moved = fixture_comparisons(model, inputs, outputs)
        for key in base:
            sensitivity[key] = max(sensitivity[key], (moved[key][0] - base[key][0]).abs().max().item())
    errors = {}
    for capability in ("default", "avx2", None):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability} if capability else os.environ
        run = subprocess.run([sys.executable, __file__, "--errors-here"], env=env, capture_output=True, text=True, check=True)
        errors[capability or torch.backends.cpu.get_cpu_capability()] = _by_family(json.loads(run.stdout))
    print(f"torch {torch.__version__}; differences to the fixture and sensitivity, max-abs per family")
    print(f"{'family':15s} {'sensitivity':>11s} {'2x':>9s} " + " ".join(f"{c:>9s}" for c in errors))
    for name, value in _by_family(sensitivity).items():
        print(f"{str(name):15s} {value:11.2e} {2 * value:9.2e} " + " ".join(f"{errors[c].get(name, 0):9.2e}" for c in errors))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
