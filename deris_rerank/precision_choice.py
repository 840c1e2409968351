"""`dtype="auto"`: the fastest precision mode for a model on this machine, chosen by measuring it.

The candidates are the modes whose agreement with float32 is measured and documented
(docs/speed.md): on the CPU, float32, int8 where torch has its quantised kernels, and bfloat16
only where its matmuls are native (AVX-512 BF16, AMX); on CUDA only float32 so far (the reduced
modes there are untested until the project has a GPU to measure them on). Each candidate runs the
model on a synthetic pair (one warm-up call, then `repeats` timed calls, alternating); a mode is
chosen only when it is at least `MIN_GAIN` faster than float32, so "auto" never picks a slower
mode. The choice is remembered per machine, torch, model config and thread count in
`$XDG_CACHE_HOME/deris-rerank/precision.json` (default ~/.cache), so only the first load measures.
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

from .int8 import available_engines
from .fileio import atomic_write
from .devices import autocast_dtype_of, bfloat16_emulation, convert_for_precision, precision

MIN_GAIN = 1.1  # float32 time / a mode's time needed to choose it over float32


def candidate_modes(device: torch.device) -> List[str]:
    """The modes "auto" may choose on `device`, float32 first."""
    if device.type != "cpu":
        return ["float32"]
    modes = ["float32"]
    if {"x86", "fbgemm"} & set(available_engines()):
        modes.append("int8")
    if bfloat16_emulation() is None:
        modes.append("bfloat16")
    return modes


def synthetic_pair(config, device: torch.device) -> Dict[str, torch.Tensor]:
    """Model inputs of one image-text pair of `config`'s sizes (random pixels, a 12-token text)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, min(1000, config.beit3.vocab_size - 1), (1, config.max_tokens), generator=generator)
    tokens[:, 11] = 2
    padding = torch.zeros(1, config.max_tokens, dtype=torch.long)
    padding[:, 12:] = 1
    return {
        "image_hi": torch.randn(1, 3, config.image_size, config.image_size, generator=generator).to(device),
        "image_lo": torch.randn(1, 3, config.image_size_lo, config.image_size_lo, generator=generator).to(device),
        "tokens": tokens.to(device), "padding_mask": padding.to(device),
    }


def time_modes(model: nn.Module, device: torch.device, modes: List[str], repeats: int = 2) -> Dict[str, float]:
    """Median ms per call of `model` (float32, left unchanged) on one synthetic pair in each mode
    (each on its own converted copy; calls alternate so that all see the same machine state)."""
    inputs = synthetic_pair(model.config, device)
    copies = {mode: model if mode == "float32" else convert_for_precision(copy.deepcopy(model), mode) for mode in modes}
    times: Dict[str, List[float]] = {mode: [] for mode in modes}
    with torch.inference_mode():
        for call in range(repeats + 1):
            for mode in modes:
                with precision(device, autocast_dtype_of(mode)):
                    began = time.perf_counter()
                    copies[mode](**inputs, with_mask_logits=False)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if call:  # the first call of each mode warms up
                        times[mode].append(1000 * (time.perf_counter() - began))
    return {mode: statistics.median(ms) for mode, ms in times.items()}


def fastest(times: Dict[str, float]) -> str:
    """The mode to use from measured ms per call: the fastest, if at least MIN_GAIN faster than float32."""
    best = min(times, key=times.get)
    return best if times["float32"] >= MIN_GAIN * times[best] else "float32"


def cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deris-rerank" / "precision.json"


def machine_key(model: nn.Module, device: torch.device) -> str:
    """What a remembered choice depends on: processor, torch build and kernels, threads, model config."""
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return "|".join([processor, torch.__version__, torch.backends.cpu.get_cpu_capability(), str(torch.get_num_threads()),
                     json.dumps(model.config.to_dict(), sort_keys=True)])


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def choose_precision(model: nn.Module, device: torch.device, reuse: bool = True) -> Tuple[str, Dict[str, float]]:
    """(mode, ms per call of each candidate) for `model` on `device`, measured now and remembered,
    or (`reuse`) as remembered for this machine, torch, thread count and config."""
    modes = candidate_modes(device)
    if len(modes) == 1:
        return modes[0], {}
    key, path = machine_key(model, device), cache_path()
    remembered = _read(path)
    if reuse and isinstance(remembered.get(key), dict) and set(remembered[key]) == set(modes):
        times = remembered[key]
    else:
        times = time_modes(model, device, modes)
        _write(path, {**remembered, key: times})
    return fastest(times), times


def _read(path: Path) -> Dict[str, Dict[str, float]]:
    try:
        stored = json.loads(path.read_text())
        return stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, choices: Dict[str, Dict[str, float]]) -> None:
    """Best effort: a cache that cannot be written only means measuring again next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(choices, indent=1)))
    except OSError:
        pass
