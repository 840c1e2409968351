"""The Swin perception backbone against upstream's fixture, manifests and a naive per-window reference."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import submodule_state

from deris_rerank.deris.config import DerisConfig, SwinConfig
from deris_rerank.deris.swin import SwinBackbone, WindowLayout

PREFIX = "perception_branch.hier_vision_encoder."
INDEX_SUFFIX = "relative_position_index"
TINY_WINDOW7 = SwinConfig(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7)


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def random_model(config: SwinConfig, seed: int) -> SwinBackbone:
    """A float64 model with every parameter drawn at a scale that keeps activations O(1)."""
    torch.manual_seed(seed)
    model = SwinBackbone(config).double().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_(0.0, 0.5)
            elif param.dim() == 1:
                param.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()))
    return model


@pytest.fixture(scope="module")
def fixture_swin_weights(parity_state):
    """Upstream Swin entries of the fixture's state dict with the prefix stripped (float64, int64 indices)."""
    return submodule_state(parity_state, PREFIX)


@pytest.fixture(scope="module")
def fixture_model(parity_config, parity_state) -> SwinBackbone:
    model = SwinBackbone(parity_config.swin).double().eval()
    model.load_state_dict(submodule_state(parity_state, PREFIX, drop=(INDEX_SUFFIX,)), strict=True)
    return model


@pytest.fixture(scope="module")
def fixture_features_float64(fixture_model, parity_inputs):
    with torch.no_grad():
        return fixture_model(parity_inputs["img"].double())


def test_fixture_parity_float64(parity_outputs, fixture_model, fixture_swin_weights, fixture_features_float64):
    assert len(fixture_features_float64) == 4
    for level, ours in enumerate(fixture_features_float64):
        ref = parity_outputs[f"swin.res{level + 2}.b0"].double()
        assert ours.dtype == torch.float64
        assert ours.shape == (2,) + ref.shape[1:]
        # The reference is stored in float32: allow its rounding only.
        assert ((ours[:1] - ref).abs() <= 2e-7 * ref.abs().clamp(min=1.0)).all(), f"res{level + 2}"

    buffers = dict(fixture_model.named_buffers())
    checkpoint_indices = {k: v for k, v in fixture_swin_weights.items() if k.endswith(INDEX_SUFFIX)}
    assert len(checkpoint_indices) == sum(fixture_model.config.depths)
    modules = dict(fixture_model.named_modules())
    for key, value in checkpoint_indices.items():
        assert torch.equal(buffers[key], value), key
        assert torch.equal(modules[key.rsplit(".", 1)[0]].derived_buffers()[INDEX_SUFFIX], value), key


def test_state_dict_keys_equal_fixture_keys(fixture_model, parity_state):
    ours = fixture_model.state_dict()
    upstream = submodule_state(parity_state, PREFIX, drop=(INDEX_SUFFIX,))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in upstream.items()}


@pytest.mark.parametrize("preset, manifest", [
    ("deris-l-refcoco", "DERIS-L-refcoco.json"),
    ("deris-b-refcoco", "DERIS-B-refcoco.json"),
])
def test_state_dict_matches_full_size_manifest(reference_dir, preset, manifest):
    entries = json.loads((reference_dir / "manifests" / manifest).read_text())["state_dict"]
    upstream = submodule_state({e["key"]: tuple(e["shape"]) for e in entries}, PREFIX)
    with torch.device("meta"):
        model = SwinBackbone(DerisConfig.preset(preset).swin)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    assert ours == {k: v for k, v in upstream.items() if not k.endswith(INDEX_SUFFIX)}
    index_buffers = {k: tuple(v.shape) for k, v in model.named_buffers() if k.endswith(INDEX_SUFFIX)}
    assert index_buffers == {k: v for k, v in upstream.items() if k.endswith(INDEX_SUFFIX)}
    # Built on meta, the buffers have no values: the loader takes them from derived_buffers().
    derived = model.layers[0].blocks[0].attn.derived_buffers()[INDEX_SUFFIX]
    window = DerisConfig.preset(preset).swin.window_size
    assert derived.device.type == "cpu" and derived.shape == (window**2, window**2)
    assert derived.min() == 0 and derived.max() == (2 * window - 1) ** 2 - 1


def test_float32_run_agrees_with_float64(fixture_model, parity_inputs, fixture_features_float64):
    model32 = SwinBackbone(fixture_model.config).eval()
    model32.load_state_dict(fixture_model.state_dict())
    with torch.no_grad():
        features32 = model32(parity_inputs["img"])
    for ours, ref in zip(features32, fixture_features_float64):
        assert ours.dtype == torch.float32
        assert max_relative_error(ours, ref) < 3e-6


def naive_block(block, x: torch.Tensor, window: int, shift: int) -> torch.Tensor:
    """Upstream's block semantics, one window at a time: pad after norm1 (no padding mask), roll,
    region labels by slice assignment, explicit softmax, reverse roll, crop, then the MLP."""
    batch, height, width, channels = x.shape
    heads = block.attn.num_heads
    head_dim = channels // heads
    y = F.layer_norm(x, (channels,), block.norm1.weight, block.norm1.bias)
    padded_h, padded_w = math.ceil(height / window) * window, math.ceil(width / window) * window
    y = F.pad(y, (0, 0, 0, padded_w - width, 0, padded_h - height))
    labels = torch.zeros(padded_h, padded_w)
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
        bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
        for i, rows in enumerate(bands):
            for j, cols in enumerate(bands):
                labels[rows, cols] = 3 * i + j
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :] + window - 1
    bias = block.attn.relative_position_bias_table[delta[0] * (2 * window - 1) + delta[1]].permute(2, 0, 1)
    out = torch.zeros_like(y)
    for b in range(batch):
        for r in range(0, padded_h, window):
            for c in range(0, padded_w, window):
                tokens = y[b, r:r + window, c:c + window].reshape(-1, channels)
                qkv = F.linear(tokens, block.attn.qkv.weight, block.attn.qkv.bias)
                q, k, v = qkv.view(-1, 3, heads, head_dim).unbind(1)
                logits = torch.einsum("qhd,khd->hqk", q * head_dim**-0.5, k) + bias
                if shift:
                    label = labels[r:r + window, c:c + window].flatten()
                    logits = logits - 100.0 * (label[:, None] != label[None, :]).double()
                mixed = torch.einsum("hqk,khd->qhd", logits.softmax(-1), v).reshape(-1, channels)
                out[b, r:r + window, c:c + window] = block.attn.proj(mixed).view(window, window, channels)
    if shift:
        out = torch.roll(out, (shift, shift), (1, 2))
    x = x + out[:, :height, :width]
    return x + block.mlp(block.norm2(x))


@pytest.mark.parametrize("height, width", [(12, 12), (10, 12), (7, 7)])
def test_window7_blocks_match_naive_reference(height, width):
    model = random_model(TINY_WINDOW7, seed=7)
    stage = model.layers[1]
    torch.manual_seed(height * 100 + width)
    x = torch.randn(2, height, width, model.config.stage_dims[1], dtype=torch.float64)
    layout = WindowLayout(height, width, 7, 3, x.device, x.dtype)
    with torch.no_grad():
        for block, shift in zip(stage.blocks, (0, 3)):
            assert block.shift_size == shift
            expected = naive_block(block, x, 7, shift)
            assert (block(x, layout) - expected).abs().max() < 1e-12, (height, width, shift)


def test_window7_padded_backbone_shapes_dtypes_and_batch_independence():
    model = random_model(TINY_WINDOW7, seed=3)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 384, 384, dtype=torch.float64)
    with torch.no_grad():
        batched = model(images)
        alone = [model(images[i:i + 1]) for i in range(2)]
        model32 = SwinBackbone(TINY_WINDOW7).eval()
        model32.load_state_dict(model.state_dict())
        features32 = model32(images.float())
    for level, feature in enumerate(batched):
        side = 384 // 2 ** (level + 2)  # 96, 48, 24, 12: padded to 98, 49, 28, 14 inside the blocks
        assert feature.shape == (2, TINY_WINDOW7.stage_dims[level], side, side)
        assert feature.is_contiguous()
        for i in range(2):
            assert (feature[i] - alone[i][level][0]).abs().max() < 1e-12
        assert features32[level].dtype == torch.float32
        assert max_relative_error(features32[level], feature) < 3e-6


def test_bfloat16_run_stays_close_to_float64(fixture_model, parity_inputs, fixture_features_float64):
    model16 = SwinBackbone(fixture_model.config).to(torch.bfloat16).eval()
    model16.load_state_dict(fixture_model.state_dict())
    with torch.no_grad():
        features16 = model16(parity_inputs["img"][:1].to(torch.bfloat16))
    for ours, ref in zip(features16, fixture_features_float64):
        assert ours.dtype == torch.bfloat16
        assert max_relative_error(ours, ref[:1]) < 0.05


def test_window_attention_matches_explicit_formula(fixture_model):
    """scaled_dot_product_attention with the summed bias + shift mask equals upstream's explicit math."""
    attn = fixture_model.layers[0].blocks[1].attn
    layout = WindowLayout(24, 24, 12, 6, torch.device("cpu"), torch.float64)
    torch.manual_seed(1)
    windows = torch.randn(2 * layout.num_windows, 144, 16, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = attn.qkv(windows).view(-1, 144, 3, 1, 16).permute(2, 0, 3, 1, 4)
        logits = (q * 16**-0.5) @ k.transpose(-2, -1) + attn.relative_position_bias().unsqueeze(0)
        logits = logits.view(2, layout.num_windows, 1, 144, 144) + layout.shift_mask.unsqueeze(1)
        logits = logits.view(-1, 1, 144, 144)
        expected = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(-1, 144, 16))
        assert (attn(windows, layout.shift_mask) - expected).abs().max() < 1e-13
