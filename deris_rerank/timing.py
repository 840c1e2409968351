"""Per-stage wall-clock timing, used by the model, the pipeline and the benchmarks."""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Dict, Iterator, Optional

import torch


class StageTimer:
    """Accumulates milliseconds per named stage: `with timer("swin"): ...`.

    On CUDA the device is synchronised before and after each stage, so a stage's time is its
    own and not the tail of an earlier asynchronous launch.
    """

    def __init__(self, device: Optional[torch.device | str] = None):
        self.ms: Dict[str, float] = {}
        self._sync = device is not None and torch.device(device).type == "cuda"

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self._sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._sync:
                torch.cuda.synchronize()
            self.ms[stage] = self.ms.get(stage, 0.0) + 1000.0 * (time.perf_counter() - start)


def stage(timer: Optional[StageTimer], name: str):
    """`timer(name)` when a timer is given, else a context that does nothing."""
    return timer(name) if timer is not None else nullcontext()
