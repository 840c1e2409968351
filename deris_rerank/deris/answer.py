"""DeRIS's answer rule on its outputs: the referring score of each candidate.

(The answer mask built from these scores lives with `Candidates`.)
"""
from __future__ import annotations

import torch

from ..errors import InputError


def refer_scores(refer_logits: torch.Tensor) -> torch.Tensor:
    """Referring score of each candidate: softmax(refer_logits, -1)[..., 0].

    refer_logits: [..., N, 2], class 0 = "referred". Returns [..., N] probabilities, in the
    logits' dtype (float32 for float16/bfloat16 logits).
    """
    if not torch.is_tensor(refer_logits) or not refer_logits.is_floating_point() or refer_logits.shape[-1:] != (2,):
        raise InputError("refer_logits: expected a floating-point tensor of shape [..., N, 2]")
    return working_precision(refer_logits).softmax(dim=-1)[..., 0]


def working_precision(tensor: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 for softmax/sigmoid; float32/float64 unchanged."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor
