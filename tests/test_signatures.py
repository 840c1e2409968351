import math

import numpy as np
import pytest
import torch

from deris_rerank.errors import InputError
from deris_rerank.rerank.signatures import (
    GRID_FIELDS,
    GRID_SIGNATURE_DIM,
    grid_signatures,
    mask_statistics,
    split_grid_signature,
)


def reference_signature(prob: np.ndarray) -> np.ndarray:
    """Loop-by-loop grid signature of one [h, w] probability map, bins as PyTorch's adaptive pooling."""
    h, w = prob.shape
    out = []
    for g in (4, 8, 16):
        means, maxes = np.zeros((g, g)), np.zeros((g, g))
        for i in range(g):
            r0, r1 = (i * h) // g, math.ceil((i + 1) * h / g)
            for j in range(g):
                c0, c1 = (j * w) // g, math.ceil((j + 1) * w / g)
                cell = prob[r0:r1, c0:c1]
                means[i, j], maxes[i, j] = cell.mean(), cell.max()
        boundary = 0.5 * (np.abs(np.diff(means, axis=1)).mean() + np.abs(np.diff(means, axis=0)).mean())
        out += [means.ravel(), maxes.ravel(), [boundary]]
    return np.concatenate(out)


def test_fixture_signatures_reproduced_in_float64(venice_inputs, venice_signatures):
    logits = venice_inputs["mask_logits"]
    stats, sigs = mask_statistics(logits), grid_signatures(logits)
    assert stats.dtype == sigs.dtype == torch.float64
    assert stats.shape == (6, 10, 4) and sigs.shape == (6, 10, GRID_SIGNATURE_DIM)
    assert (stats - venice_signatures["mask_stats"]).abs().max() <= 1e-10
    assert (sigs - venice_signatures["grid_signatures"]).abs().max() <= 1e-10


def test_float32_and_bfloat16_inputs_are_computed_in_float32(venice_inputs, venice_signatures):
    logits = venice_inputs["mask_logits"]
    sigs32 = grid_signatures(logits.float())
    assert sigs32.dtype == torch.float32
    assert (sigs32.double() - venice_signatures["grid_signatures"]).abs().max() < 1e-5
    stats_bf16 = mask_statistics(logits.bfloat16())
    assert stats_bf16.dtype == torch.float32
    # bf16 logits carry ~3 significant digits; statistics stay close to the exact ones.
    assert (stats_bf16.double() - venice_signatures["mask_stats"]).abs().max() < 2e-2


@pytest.mark.parametrize("h, w", [(37, 50), (96, 20), (13, 29), (7, 9), (33, 16)])
def test_non_square_and_odd_sizes_match_adaptive_pooling_bins(h, w):
    gen = torch.Generator().manual_seed(h * 100 + w)
    logits = torch.randn(2, 3, h, w, generator=gen, dtype=torch.float64) * 3
    sigs = grid_signatures(logits)
    probs = torch.sigmoid(logits).numpy()
    expected = np.stack([[reference_signature(probs[b, n]) for n in range(3)] for b in range(2)])
    np.testing.assert_allclose(sigs.numpy(), expected, rtol=0, atol=1e-12)


def test_hand_made_half_mask():
    logits = torch.full((1, 32, 32), -30.0, dtype=torch.float64)
    logits[0, :, :16] = 30.0  # left half on
    mean, peak, area, std = mask_statistics(logits)[0].tolist()
    assert mean == pytest.approx(0.5) and peak == pytest.approx(1.0) and area == pytest.approx(0.5)
    assert std == pytest.approx(math.sqrt(32 * 32 / (32 * 32 - 1)) * 0.5)  # unbiased
    fields = split_grid_signature(grid_signatures(logits)[0])
    assert fields["grid_mean_4"].view(4, 4)[0].tolist() == pytest.approx([1, 1, 0, 0])
    # one jump of 1 among 3 horizontal steps per row, none vertically
    assert fields["boundary_4"].item() == pytest.approx(0.5 * (1 / 3 + 0))
    assert fields["boundary_16"].item() == pytest.approx(0.5 * (1 / 15))


def test_leading_dims_are_independent():
    logits = torch.randn(2, 3, 10, 24, 20, dtype=torch.float64)
    batched = grid_signatures(logits)
    assert batched.shape == (2, 3, 10, GRID_SIGNATURE_DIM)
    assert torch.equal(batched[1, 2], grid_signatures(logits[1, 2]))
    assert mask_statistics(logits).shape == (2, 3, 10, 4)
    assert torch.equal(mask_statistics(logits)[0, 1], mask_statistics(logits[0, 1]))


def test_split_fields_cover_the_signature_in_order():
    sig = torch.arange(2 * GRID_SIGNATURE_DIM, dtype=torch.float64).view(2, GRID_SIGNATURE_DIM)
    fields = split_grid_signature(sig)
    assert list(fields) == [name for name, _ in GRID_FIELDS]
    assert fields["grid_mean_4"].shape == (2, 16) and fields["boundary_16"].shape == (2,)
    rebuilt = torch.cat([f if f.dim() == 2 else f[:, None] for f in fields.values()], dim=-1)
    assert torch.equal(rebuilt, sig)


@pytest.mark.parametrize("bad", [torch.zeros(4, 5, dtype=torch.float32), torch.zeros(2, 4, 5, dtype=torch.long)])
def test_bad_inputs_are_rejected(bad):
    with pytest.raises(InputError, match=r"\[\.\.\., N, h, w\]"):
        grid_signatures(bad)


@pytest.mark.gpu
def test_cuda_matches_cpu(venice_inputs):
    logits = venice_inputs["mask_logits"]
    assert torch.allclose(grid_signatures(logits.cuda()).cpu(), grid_signatures(logits), atol=1e-12, rtol=0)
    assert torch.allclose(mask_statistics(logits.cuda()).cpu(), mask_statistics(logits), atol=1e-12, rtol=0)
