"""Device and precision settings: "auto" -> CUDA when available; float32, a reduced-precision
autocast (bfloat16 or float16 on CUDA; bfloat16 on the CPU, where oneDNN runs bfloat16 matmuls
with AVX-512 BF16/AMX when the processor has them), or int8 linear layers on the CPU (`int8`). The model keeps softmaxes, deformable
sampling and mask upsampling in float32 under autocast, and the signatures and gate run in float32.
`store_for_autocast` keeps the weights autocast would round on every call already rounded.

On a CPU without native bfloat16 instructions the bfloat16 mode is emulated and far slower than
float32 (AVX2 AMD EPYC, 2 threads: a 2048^2 bfloat16 matmul about 0.3 GFLOP/s against about 160 in
float32; DeRIS-B 1.4 s -> 42 s per pair): asking for it there warns once (`SlowDtypeWarning`), and
nothing picks it by default (float32 is every default)."""
from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import ContextManager, FrozenSet, List, Optional, Union

import torch
from torch import nn

from .errors import InputError, SlowDtypeWarning

# The precision modes a model runs in (`resolve_precision`), and the autocast dtype of those that are autocast.
PRECISION_MODES = ("float32", "bfloat16", "float16", "int8")
MODE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: Union[str, torch.device]) -> torch.device:
    """"auto" -> CUDA when available, else CPU; an explicit CUDA device without CUDA is a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return device


def resolve_precision(dtype: Union[None, str, torch.dtype], device: torch.device) -> str:
    """The precision mode a `dtype` setting names on `device`: "float32" (None, "float32"), "bfloat16"
    / "float16" (autocast; float16 on CUDA only), "int8" (dynamic int8 linear layers, CPU only: see
    `int8`) or "auto" (left for the caller, who measures: see `precision_choice`).

    bfloat16 on a CPU that lacks native bfloat16 instructions warns once per process (see
    `bfloat16_emulation`)."""
    if dtype is None or dtype in ("float32", "fp32", torch.float32):
        return "float32"
    mode = MODE_ALIASES.get(dtype, dtype) if isinstance(dtype, str) else {v: k for k, v in AUTOCAST_DTYPES.items()}.get(dtype)
    if mode not in PRECISION_MODES + ("auto",):
        raise InputError(f"dtype must be one of {', '.join(PRECISION_MODES)} or auto, got {dtype}")
    if mode == "float16" and device.type != "cuda":
        raise InputError(f"dtype float16 runs as CUDA autocast; on {device.type} use float32, int8 or bfloat16")
    if mode == "int8" and device.type != "cpu":
        raise InputError(f"dtype int8 runs on the CPU only; on {device.type} use float32, bfloat16 or float16")
    if mode == "bfloat16" and device.type == "cpu":
        emulated = bfloat16_emulation()
        if emulated:
            warn_slow_bfloat16(emulated)
    return mode


def autocast_dtype_of(mode: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision mode (bfloat16 / float16), None for float32 and int8."""
    return AUTOCAST_DTYPES.get(mode)


# CPU features with which bfloat16 matmuls run natively, as torch.cpu.get_capabilities() and
# /proc/cpuinfo name them: x86's AVX-512 BF16 and AMX, Arm's BF16 extension (NEON and SVE)
NATIVE_BFLOAT16_FEATURES = frozenset({"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})
# words in oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) whose ISAs include bfloat16 instructions
ONEDNN_BFLOAT16_ISA_WORDS = ("BF16", "FP16", "AMX", "AVX10", "ALL", "DEFAULT")


def cpu_features() -> Optional[FrozenSet[str]]:
    """The CPU's instruction-set features (lower case), from torch.cpu.get_capabilities() where
    this torch has it, else from Linux's /proc/cpuinfo; None where neither tells."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return frozenset(name for name, value in get_capabilities().items() if value is True)
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1] for line in lines if line.startswith(("flags", "Features"))), None)
    return frozenset(flags.split()) if flags is not None else None


def bfloat16_emulation() -> Optional[str]:
    """Why bfloat16 matmuls are emulated on this CPU (a clause to print), or None where they run on
    native instructions or this cannot be told.

    The hardware decides, not torch's own kernel choice: with ATEN_CPU_CAPABILITY=avx2 (or
    default) a bfloat16 matmul still runs on oneDNN's AVX-512 BF16 code (measured on an AMD EPYC
    with AVX512_BF16, 2 threads, 2048^2: 87 GFLOP/s native, 99 with avx2 kernels forced, 160 with
    default ones; float32 31-60). oneDNN's own limit does count: ONEDNN_MAX_CPU_ISA=AVX2 makes it
    0.3 GFLOP/s on that machine, as on an AVX2-only CPU.
    """
    features = cpu_features()
    if features is None:
        return None
    if not features & NATIVE_BFLOAT16_FEATURES:
        return "this CPU has no native bfloat16 instructions (AVX-512 BF16 or AMX)"
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        limit = os.environ.get(name)
        if limit and not any(word in limit.upper() for word in ONEDNN_BFLOAT16_ISA_WORDS):
            return f"{name}={limit} keeps oneDNN from this CPU's bfloat16 instructions"
    return None


_slow_bfloat16_announced = False


def warn_slow_bfloat16(reason: str) -> None:
    """Say once per process that bfloat16 is emulated here, `reason` saying why (a SlowDtypeWarning)."""
    global _slow_bfloat16_announced
    if not _slow_bfloat16_announced:
        _slow_bfloat16_announced = True
        warnings.warn(SlowDtypeWarning(
            f"dtype bfloat16 is slow here: {reason}, so its matmuls are emulated, 20-30x slower than float32 "
            "(DeRIS-B: 1.4 s -> 42 s per pair on an AVX2 AMD EPYC); use float32 (the default) on this machine, "
            "bfloat16 on CUDA or on a CPU with AVX-512 BF16 or AMX"), stacklevel=3)


def precision(device: torch.device, autocast_dtype: Optional[torch.dtype]) -> ContextManager:
    """The autocast context for `autocast_dtype` on `device` (a no-op for float32)."""
    return torch.autocast(device_type=device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()


def is_low_precision(dtype: Optional[torch.dtype]) -> bool:
    """Whether `dtype` is one autocast lowers matmuls to (bfloat16, float16); None/float32/float64 are not."""
    return dtype in (torch.bfloat16, torch.float16)


# The layers whose weights autocast casts to its low-precision dtype on every call (CPU and CUDA
# autocast both run linear and convolution in the low-precision dtype).
AUTOCAST_MATMUL_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def store_for_autocast(model: nn.Module, autocast_dtype: Optional[torch.dtype]) -> nn.Module:
    """Store the weights and biases of `model`'s linear and convolution layers in `autocast_dtype`,
    in place, and return the model (float32 / None: unchanged).

    Under autocast these layers round their float32 weights to the low-precision dtype on every
    call: for DeRIS-L that is 2.9 GiB of weights read and 1.5 GiB written per forward, a fifth of
    the bfloat16 time on a CPU. Rounded once here, the results under autocast are bit-identical
    (the same round-to-nearest of the same numbers) and the weights take half the memory. Other
    parameters (norms, embeddings, position tables) stay float32. The model must then run under
    autocast: a float32 call into these layers fails with a dtype error instead of silently
    computing in low precision.
    """
    if not is_low_precision(autocast_dtype):
        return model
    for module in model.modules():
        if isinstance(module, AUTOCAST_MATMUL_LAYERS):
            module.to(autocast_dtype)
    return model


def autocast_weight_names(model: nn.Module) -> List[str]:
    """Full names of the parameters `store_for_autocast` stores in low precision (for a loader that
    converts them one by one as it reads them, so that a float32 and a low-precision copy of the
    whole model never coexist)."""
    return [f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if isinstance(module, AUTOCAST_MATMUL_LAYERS)
            for name, _ in module.named_parameters(recurse=False)]


def convert_for_precision(model: nn.Module, mode: str) -> nn.Module:
    """`model` (float32, in place) made ready to run in precision `mode`: the autocast modes' linear
    and convolution weights stored in their dtype (`store_for_autocast`), int8's linear layers
    quantised (`int8.quantize_int8`); float32 unchanged. Returns the model."""
    if mode == "int8":
        from .int8 import quantize_int8  # the quantised kernels load only when asked for

        return quantize_int8(model)
    return store_for_autocast(model, autocast_dtype_of(mode))
