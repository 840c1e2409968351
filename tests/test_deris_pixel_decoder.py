"""DeRIS pixel decoder: deformable sampling, sine positions, state-dict keys, fixture parity."""
import copy
import json
import math

import pytest
import torch
from conftest import submodule_state
from parity_bounds import assert_matches_fixture

from deris_rerank.deris.config import DerisConfig
from deris_rerank.deris.deform_attn import ms_deform_attn_sample
from deris_rerank.deris.pixel_decoder import PixelDecoder, reference_points
from deris_rerank.deris.position import sine_position_embedding_2d
from deris_rerank.deris.swin import SwinBackbone

PREFIX = "perception_branch.pixel_decoder."
SWIN_PREFIX = "perception_branch.hier_vision_encoder."
MANIFESTS = ["DERIS-L-refcoco", "DERIS-B-refcoco", "DERIS-L-grefcoco", "DERIS-B-grefcoco"]
FLOAT32_HALF_ULP = 2.0**-24  # relative rounding error of a float64 value stored as float32


@pytest.fixture(scope="module")
def decoder64(parity_config, parity_state):
    decoder = PixelDecoder(parity_config).double().eval()
    decoder.load_state_dict(submodule_state(parity_state, PREFIX), strict=True)
    return decoder


@pytest.fixture(scope="module")
def swin_maps_b0(parity_outputs):
    """The fixture's float32-stored Swin outputs of sample 0, [res2, res3, res4, res5], float64."""
    return [parity_outputs[f"swin.res{i}.b0"].double() for i in (2, 3, 4, 5)]


@pytest.fixture(scope="module")
def outputs64(decoder64, swin_maps_b0):
    with torch.no_grad():
        return decoder64(swin_maps_b0)


def reference_maps(outputs):
    """Stored (mask_features of sample 0 [1,C,96,96], multi-scale maps of both samples), float64."""
    mask = outputs["pixel_decoder.mask_features.b0"].double()
    return mask, [outputs[f"pixel_decoder.multi_scale_features.{i}"].double() for i in range(3)]


# --------------------------------------------------------------------------------------------
# ms_deform_attn_sample against explicit bilinear interpolation


def naive_deform_sample(value, spatial_shapes, locations, weights):
    """Loop-by-loop bilinear sampling (pixel centres at integer + 0.5, zeros outside)."""
    batch, _, heads, head_dim = value.shape
    _, num_queries, _, num_levels, num_points, _ = locations.shape
    starts = [0]
    for h, w in spatial_shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, num_queries, heads, head_dim, dtype=value.dtype)
    for n in range(batch):
        for q in range(num_queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(spatial_shapes):
                    for p in range(num_points):
                        x = locations[n, q, m, lvl, p, 0].item() * w - 0.5
                        y = locations[n, q, m, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        for xi in (x0, x0 + 1):
                            for yi in (y0, y0 + 1):
                                if 0 <= xi < w and 0 <= yi < h:
                                    corner = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    pixel = value[n, starts[lvl] + yi * w + xi, m]
                                    out[n, q, m] += weights[n, q, m, lvl, p] * corner * pixel
    return out.reshape(batch, num_queries, heads * head_dim)


def random_sampling_problem(dtype=torch.float64):
    gen = torch.Generator().manual_seed(7)
    shapes = [(3, 4), (2, 5)]
    batch, queries, heads, head_dim, points = 2, 5, 2, 3, 2
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=gen, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=gen, dtype=dtype) * 1.6 - 0.3
    locations[0, 0, 0, 0, 0] = torch.tensor([-0.6, 0.5])  # wholly outside: samples zero
    locations[0, 0, 0, 1, 1] = torch.tensor([0.05, 0.97])  # straddles the left and bottom borders
    locations[1, 2, 1, 0, 0] = torch.tensor([1.0, 1.0])  # bottom-right corner: a quarter of a pixel
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=gen, dtype=dtype)
    return value, shapes, locations, weights


def test_deform_sample_matches_explicit_bilinear_interpolation():
    value, shapes, locations, weights = random_sampling_problem()
    assert ((locations < 0) | (locations > 1)).any()
    ours = ms_deform_attn_sample(value, shapes, locations, weights)
    expected = naive_deform_sample(value, shapes, locations, weights)
    assert ours.dtype == torch.float64 and ours.shape == (2, 5, 6)
    assert (ours - expected).abs().max() <= 1e-12


def points_last_deform_sample(value, spatial_shapes, locations, weights):
    """The plain formulation: each level sampled as [Lq, P] per head, then weighted and summed over P."""
    batch, _, heads, head_dim = value.shape
    levels = value.split([h * w for h, w in spatial_shapes], dim=1)
    output = 0
    for level, (h, w) in enumerate(spatial_shapes):
        level_value = levels[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, h, w)
        grid = (2 * locations[:, :, :, level] - 1).transpose(1, 2).flatten(0, 1)
        sampled = torch.nn.functional.grid_sample(level_value, grid, align_corners=False)  # [N*M, D, Lq, P]
        output = output + (sampled * weights[:, :, :, level].transpose(1, 2).flatten(0, 1)[:, None]).sum(-1)
    return output.view(batch, heads * head_dim, -1).transpose(1, 2)


def test_deform_sample_in_float32_has_the_bits_of_the_points_last_formulation():
    """The [P, Lq] sampling layout (a speed-up) adds the same products in the same order."""
    value, shapes, locations, weights = random_sampling_problem(torch.float32)
    ours = ms_deform_attn_sample(value, shapes, locations, weights)
    assert torch.equal(ours, points_last_deform_sample(value, shapes, locations, weights))


def test_deform_sample_outside_every_map_is_zero():
    value, shapes, locations, weights = random_sampling_problem()
    out = ms_deform_attn_sample(value, shapes, torch.full_like(locations, -0.75), weights)
    assert torch.count_nonzero(out) == 0


def test_deform_sample_runs_in_float32_for_bfloat16_values():
    value, shapes, locations, weights = random_sampling_problem(torch.float32)
    out = ms_deform_attn_sample(value.bfloat16(), shapes, locations.bfloat16(), weights.bfloat16())
    in_float32 = ms_deform_attn_sample(value.bfloat16().float(), shapes, locations.bfloat16().float(),
                                       weights.bfloat16().float())
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, in_float32.bfloat16())


def test_deform_sample_stays_in_float32_under_autocast():
    """Under autocast the sampling and its weighted sum stay float32: the same bits as without autocast."""
    value, shapes, locations, weights = random_sampling_problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ms_deform_attn_sample(value, shapes, locations, weights)
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, ms_deform_attn_sample(value, shapes, locations, weights))


# --------------------------------------------------------------------------------------------
# positions and reference points


def test_sine_position_embedding_values_and_float32_arithmetic():
    height, width, feats = 5, 7, 16
    pos = sine_position_embedding_2d(height, width, feats)
    assert pos.dtype == torch.float32 and pos.shape == (1, 2 * feats, height, width)

    # upstream's float32 arithmetic, written per pixel: must agree bit for bit
    k = torch.arange(feats, dtype=torch.float32)
    wavelength = 10000 ** (2 * torch.div(k, 2, rounding_mode="floor") / feats)
    rows = torch.arange(1, height + 1, dtype=torch.float32)[:, None].expand(height, width)
    cols = torch.arange(1, width + 1, dtype=torch.float32)[None, :].expand(height, width)
    even = k % 2 == 0

    def encode(coord, size):
        angle = (coord / (torch.tensor(size, dtype=torch.float32) + 1e-6) * (2 * math.pi))[..., None] / wavelength
        return torch.where(even, angle.sin(), angle.cos()).permute(2, 0, 1)

    assert torch.equal(pos[0], torch.cat([encode(rows, height), encode(cols, width)]))

    # and the closed form in float64, y half first
    i, j = 3, 6
    y, x = 2 * math.pi * (i + 1) / (height + 1e-6), 2 * math.pi * (j + 1) / (width + 1e-6)
    assert abs(pos[0, 0, i, j].item() - math.sin(y)) < 1e-6
    assert abs(pos[0, 1, i, j].item() - math.cos(y)) < 1e-6
    assert abs(pos[0, feats + 2, i, j].item() - math.sin(x / 10000 ** (2 / feats))) < 1e-6
    assert abs(pos[0, feats + 3, i, j].item() - math.cos(x / 10000 ** (2 / feats))) < 1e-6


def test_reference_points_are_float32_pixel_centres():
    ref = reference_points([(2, 4), (1, 2)], torch.device("cpu"))
    assert ref.dtype == torch.float32 and ref.shape == (1, 10, 1, 2)
    expected = [(x / 8, y / 4) for y in (1, 3) for x in (1, 3, 5, 7)] + [(0.25, 0.5), (0.75, 0.5)]
    assert torch.equal(ref[0, :, 0], torch.tensor(expected, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# state-dict keys


def test_state_dict_keys_and_shapes_equal_the_fixture(parity_config, parity_state):
    expected = {k: tuple(v.shape) for k, v in submodule_state(parity_state, PREFIX).items()}
    ours = {k: tuple(v.shape) for k, v in PixelDecoder(parity_config).state_dict().items()}
    assert ours == expected


@pytest.mark.parametrize("name", MANIFESTS)
def test_state_dict_keys_and_shapes_equal_the_manifest(reference_dir, name):
    manifest = json.loads((reference_dir / "manifests" / f"{name}.json").read_text())
    entries = [e for e in manifest["state_dict"] if e["key"].startswith(PREFIX)]
    expected = [(e["key"][len(PREFIX):], tuple(e["shape"])) for e in entries]
    with torch.device("meta"):
        decoder = PixelDecoder(DerisConfig.preset(name))
    assert [(k, tuple(v.shape)) for k, v in decoder.state_dict().items()] == expected
    assert sum(p.numel() for p in decoder.parameters()) == manifest["parameters_by_prefix"][PREFIX[:-1]]


# --------------------------------------------------------------------------------------------
# parity with the fixture


def test_outputs_match_fixture_from_stored_swin_maps(outputs64, parity_outputs):
    """Fed the float32-stored Swin maps of sample 0, the float64 decoder matches the fixture.

    The stored Swin maps are float32 roundings of upstream's float64 maps, so the outputs may
    move by as much as that rounding moves them. Measured on this fixture: perturbing every
    input by a uniform random relative error of up to half a float32 ulp (8 draws) moves the
    outputs by at most 3.9e-7 * max(1, |ref|) elementwise, and the actual difference to the
    fixture is 2.2e-7 * max(1, |ref|). The tolerance is 4x the measured sensitivity. (The
    chained Swin test below checks the same outputs to float32 storage rounding.)
    """
    mask_features, multi_scale = outputs64
    ref_mask, ref_maps = reference_maps(parity_outputs)
    tolerance = 1.5e-6
    assert mask_features.shape == ref_mask.shape == (1, 64, 96, 96)
    assert ((mask_features - ref_mask).abs() / ref_mask.abs().clamp(min=1)).max() <= tolerance
    for ours, ref, side in zip(multi_scale, ref_maps, (12, 24, 48)):
        assert ours.shape == (1, 64, side, side)
        assert ((ours - ref[:1]).abs() / ref[:1].abs().clamp(min=1)).max() <= tolerance


def test_swin_then_pixel_decoder_matches_fixture_to_storage_rounding(
    parity_config, parity_state, parity_inputs, parity_outputs, decoder64
):
    """Swin -> pixel decoder on the fixture image, float64: every stored float32 value of the
    multi-scale maps is the rounding of ours (|ours - ref| <= half an ulp of ref, plus 1e-12 for
    float64 noise); tight enough to catch a missing float32 cast: building the positions or the
    reference points in float64 breaks it (1e-7 to 3e-7). The mask features come after the float32
    FPN upsample, whose kernel gives other last bits on other CPU instruction sets (measured
    under default kernels: 1.5e-7 beyond storage rounding): they get the bound derived for them in
    tests/parity_bounds.py on top (2.9e-6), and test_deris_parity checks that the cast is there."""
    swin = SwinBackbone(parity_config.swin).double().eval()
    swin.load_state_dict(submodule_state(parity_state, SWIN_PREFIX, drop=("relative_position_index",)), strict=True)
    image = parity_inputs["img"].double()
    with torch.no_grad():
        mask_features, multi_scale = decoder64(swin(image))

    def within_storage_rounding(ours, ref):
        bound = FLOAT32_HALF_ULP * ref.abs() + 1e-12 * ref.abs().clamp(min=1)
        return bool(((ours - ref).abs() <= bound).all())

    _, ref_maps = reference_maps(parity_outputs)
    assert_matches_fixture(mask_features[:1], parity_outputs["pixel_decoder.mask_features.b0"], "pixel_decoder.mask_features.b0")
    for ours, ref in zip(multi_scale, ref_maps):
        assert ours.shape == ref.shape
        assert within_storage_rounding(ours, ref)


def relative_to_max(ours, ref):
    return ((ours.double() - ref).abs().max() / ref.abs().max()).item()


def test_float32_decoder_agrees_with_float64(decoder64, swin_maps_b0, outputs64):
    decoder32 = copy.deepcopy(decoder64).float()
    with torch.no_grad():
        mask_features, multi_scale = decoder32([x.float() for x in swin_maps_b0])
    assert mask_features.dtype == torch.float32
    # measured: 4.7e-7 (mask features) and <= 6.4e-7 (encoder maps)
    assert relative_to_max(mask_features, outputs64[0]) <= 5e-6
    for ours, ref in zip(multi_scale, outputs64[1]):
        assert ours.dtype == torch.float32
        assert relative_to_max(ours, ref) <= 5e-6


def test_bfloat16_decoder_runs_in_bfloat16_and_stays_close(decoder64, swin_maps_b0, outputs64):
    decoder16 = copy.deepcopy(decoder64).bfloat16()
    with torch.no_grad():
        mask_features, multi_scale = decoder16([x.bfloat16() for x in swin_maps_b0])
    assert mask_features.dtype == torch.bfloat16 and mask_features.shape == (1, 64, 96, 96)
    # measured: about 1e-2 of the largest magnitude (bfloat16 has 8 significant bits)
    assert relative_to_max(mask_features, outputs64[0]) <= 4e-2
    for ours, ref in zip(multi_scale, outputs64[1]):
        assert ours.dtype == torch.bfloat16
        assert relative_to_max(ours, ref) <= 4e-2


@pytest.mark.gpu
def test_cuda_float64_matches_cpu(decoder64, swin_maps_b0, outputs64):
    decoder = copy.deepcopy(decoder64).cuda()
    with torch.no_grad():
        mask_features, multi_scale = decoder([x.cuda() for x in swin_maps_b0])
    assert (mask_features.cpu() - outputs64[0]).abs().max() <= 1e-10
    for ours, ref in zip(multi_scale, outputs64[1]):
        assert (ours.cpu() - ref).abs().max() <= 1e-10


@pytest.mark.gpu
def test_cuda_bfloat16_runs_and_stays_close(decoder64, swin_maps_b0, outputs64):
    decoder = copy.deepcopy(decoder64).cuda().bfloat16()
    with torch.no_grad():
        mask_features, multi_scale = decoder([x.cuda().bfloat16() for x in swin_maps_b0])
    assert mask_features.dtype == torch.bfloat16
    assert relative_to_max(mask_features.cpu(), outputs64[0]) <= 4e-2
    for ours, ref in zip(multi_scale, outputs64[1]):
        assert relative_to_max(ours.cpu(), ref) <= 4e-2
