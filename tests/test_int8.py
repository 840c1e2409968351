"""int8: DeRIS's linear layers quantised once at load (dynamic int8), close to float32 within
bounds measured on the test-sized model, the heads kept float32, the caller's model untouched,
and one line where int8 cannot run."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import build_tiny_model
from deris_rerank import Pipeline, int8
from deris_rerank.errors import InputError
from deris_rerank.precision_choice import synthetic_pair

CPU = torch.device("cpu")
DYNAMIC_LINEAR = torch.ao.nn.quantized.dynamic.Linear


def random_pair(config, seed):
    pair = synthetic_pair(config, CPU)
    generator = torch.Generator().manual_seed(seed)
    pair["image_hi"] = torch.randn(pair["image_hi"].shape, generator=generator)
    pair["image_lo"] = torch.randn(pair["image_lo"].shape, generator=generator)
    return pair


def test_the_encoders_and_decoder_are_quantised_and_the_heads_are_not():
    model = int8.quantize_int8(build_tiny_model())
    kinds = {name: type(module) for name, module in model.named_modules()}
    quantised = {name for name, kind in kinds.items() if kind is DYNAMIC_LINEAR}
    assert {name.split(".", 1)[0] for name in quantised} == set(int8.INT8_PARTS)
    assert any(name.startswith("decoder.Q2TCA") for name in quantised)
    for name, kind in kinds.items():
        if any(head in name for head in int8.FLOAT32_LINEAR_NAMES) and kind in (nn.Linear, DYNAMIC_LINEAR):
            assert kind is nn.Linear, f"{name} is a head and must stay float32"
    assert all(kinds[name] is nn.Linear for name in kinds if name.startswith(("pixel_decoder.", "cognition."))
               and kinds[name] in (nn.Linear, DYNAMIC_LINEAR))


def test_int8_outputs_stay_within_the_bounds_measured_on_the_test_model():
    """Measured over five random pairs on TINY_CONFIG (AMD/Intel, x86 engine): scores differ by at
    most 0.019, mask logits by at most 0.035 (their mean magnitude is ~0.11, so 0.9% of pixels
    binarise differently at most), the top candidate never changes. Bounds: about 2.5x those."""
    model = build_tiny_model()
    quantised = int8.quantize_int8(copy.deepcopy(model))
    for seed in range(2):
        pair = random_pair(model.config, seed)
        with torch.inference_mode():
            want, got = model(**pair), quantised(**pair)
        assert not torch.equal(want.mask_logits, got.mask_logits)  # int8 really ran
        assert (want.scores - got.scores).abs().max() < 0.05
        assert (want.mask_logits - got.mask_logits).abs().max() < 0.1
        assert ((want.mask_logits >= 0) != (got.mask_logits >= 0)).float().mean() < 0.025
        assert torch.equal(want.scores.argmax(-1), got.scores.argmax(-1))


def test_pipeline_int8_quantises_once_and_leaves_a_built_model_as_it_was(tiny_model_dir):
    image = np.random.default_rng(3).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    built = build_tiny_model()
    pipe = Pipeline(deris=built, gate=False, tokenizer=tiny_model_dir / "deris" / "beit3.spm", device="cpu", dtype="int8")
    assert pipe.precision == "int8" and pipe.autocast_dtype is None
    assert pipe.model is not built and not any(isinstance(m, DYNAMIC_LINEAR) for m in built.modules())
    layers = [m for m in pipe.model.modules() if isinstance(m, DYNAMIC_LINEAR)]
    assert len(layers) == len(int8.int8_linear_names(built))
    from_files = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu", dtype="int8")
    plain = Pipeline(deris=tiny_model_dir / "deris", gate=False, device="cpu")
    first = from_files(image, "the red car")
    assert sum(isinstance(m, DYNAMIC_LINEAR) for m in from_files.model.modules()) == len(layers)
    again = from_files(image, "the red car")
    assert np.array_equal(first.scores, again.scores)  # quantised at load, not per call
    want = plain(image, "the red car")
    assert np.abs(np.asarray(first.scores) - np.asarray(want.scores)).max() < 0.05


def test_int8_without_quantised_kernels_is_one_line(monkeypatch):
    monkeypatch.setattr(int8, "available_engines", lambda: ["none"])
    with pytest.raises(InputError, match=r"^dtype int8 needs torch's x86 or fbgemm quantised kernels, .*use float32"):
        int8.quantize_int8(build_tiny_model())


def test_int8_of_a_model_on_another_device_is_refused():
    model = build_tiny_model().to("meta")
    with pytest.raises(InputError, match="int8 runs on the CPU only"):
        int8.quantize_int8(model)


def test_quantising_says_nothing_about_torch_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        int8.quantize_int8(build_tiny_model())
