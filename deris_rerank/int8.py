"""int8 inference on the CPU: DeRIS's linear layers quantised once, dynamically (`quantize_int8`).

Dynamic quantisation (torch's `quantize_dynamic`, the x86/fbgemm engine) stores each chosen
`nn.Linear` weight as int8 with one scale per output channel and quantises each call's
activations on the fly with a scale from their own range; the matmul runs in int8 with int32
accumulation (VNNI where the CPU has it) and the output comes back as float32. Everything else
(convolutions, norms, softmaxes, the deformable sampling, mask upsampling) stays float32.

Which parts are quantised (`INT8_PARTS`) was decided from measured agreement with float32
(docs/speed.md, "int8"): the Swin and BEiT-3 encoders and the loopback decoder's linear layers
carry nearly all of DeRIS-L's matmul time; the pixel decoder's deformable-attention offsets and
weights decide where it samples, and the heads (mask embedding, referring and existence scores)
decide the answer directly, so they stay float32.

torch marks its eager quantisation API deprecated in favour of torchao; it is still the one that
runs int8 matmuls on a stock CPU wheel without compiling. A torch without it gives one line.
"""
from __future__ import annotations

import warnings
from typing import Iterable, List

import torch
from torch import nn

from .errors import InputError

# Submodules of DerisModel whose nn.Linear layers become int8, and linear layers inside them that
# stay float32 (name fragments: the loopback decoder's mask, box, class and referring heads).
# Attention in nn.MultiheadAttention keeps its float32 projections (torch does not quantise them).
INT8_PARTS = ("swin", "beit3", "decoder")
FLOAT32_LINEAR_NAMES = ("mask_embed", "box_embed", "SEG_cls", "refer_proj")


def available_engines() -> List[str]:
    """The quantised-kernel engines this torch build has (e.g. x86, fbgemm, onednn, qnnpack)."""
    return list(torch.backends.quantized.supported_engines)


def quantized_engine() -> str:
    """The quantised-kernel engine int8 runs on here ("x86" or "fbgemm"), or raise InputError
    naming why int8 cannot run (no such engine in this torch build, or no dynamic quantisation)."""
    if not hasattr(torch.ao.quantization, "quantize_dynamic"):
        raise InputError(f"dtype int8 needs torch.ao.quantization.quantize_dynamic, which torch {torch.__version__} "
                         "lacks; use float32 (the default)")
    engines = available_engines()
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            return engine
    raise InputError(f"dtype int8 needs torch's x86 or fbgemm quantised kernels, which this torch build lacks "
                     f"(it has {', '.join(engines)}); use float32 (the default)")


def int8_linear_names(model: nn.Module, parts: Iterable[str] = INT8_PARTS) -> List[str]:
    """Full names of the nn.Linear layers of `model` that `quantize_int8` quantises."""
    parts = tuple(parts)
    return [name for name, module in model.named_modules()
            if type(module) is nn.Linear and name.split(".", 1)[0] in parts
            and not any(fragment in name for fragment in FLOAT32_LINEAR_NAMES)]


def quantize_int8(model: nn.Module, parts: Iterable[str] = INT8_PARTS) -> nn.Module:
    """Quantise the linear layers of `model` named by `int8_linear_names(model, parts)` to dynamic
    int8, in place, and return the model (float32, on the CPU, in eval mode; quantised once here,
    never per call). Raises InputError where the model is elsewhere or int8 cannot run."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise InputError(f"dtype int8 runs on the CPU only (the model is on {device}); on CUDA use float32, "
                         "bfloat16 or float16")
    engine = quantized_engine()
    names = set(int8_linear_names(model, parts))
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():  # torch's deprecation notice for the eager API: see the module docstring
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*(deprecated|torchao).*")
        qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
        torch.ao.quantization.quantize_dynamic(model.eval(), {name: qconfig for name in names}, dtype=torch.qint8,
                                               inplace=True)
    return model
