"""Capture a static-shape program once in a ``torch.cuda.CUDAGraph`` and replay it; run it eagerly, with the reason
logged, where capture is off or impossible."""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

__all__ = ["CapturedProgram", "capture_unavailable"]

log = logging.getLogger(__name__)


def capture_unavailable(device: torch.device | str) -> str | None:
    """Why work on ``device`` cannot be captured in a CUDA graph, or ``None`` if it can."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"device is {device.type}: CUDA graphs need a CUDA device"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


class CapturedProgram:
    """``body()`` captured once, then each call replays its kernels on whatever its tensors hold.

    ``body`` must be a static program: it reads and writes only tensors allocated before capture (its inputs,
    outputs and state), has the same shapes on every call, and never reads a device value on the host. It is run
    ``warmup`` times on a side stream before capture (cuBLAS handles, kernel selection, lazy caches), so those runs
    must be harmless, e.g. on scratch rows.

    Args:
        body: the program.
        device: where it runs; on a non-CUDA device every call runs ``body`` eagerly.
        enabled: ``False`` runs eagerly (``fallback_reason`` says so).
        pool: a memory pool shared with other graphs replayed one at a time (``torch.cuda.graph_pool_handle()``).
        name: for the log.
        warmup: eager runs before capture.

    If capture raises (an operation that synchronizes or is not capturable), the program runs eagerly from then on,
    the reason is in ``fallback_reason`` and logged as a warning; ``pool`` may then be unusable for other captures
    (PyTorch can leave it marked as recording), so give the next ones a fresh pool.
    """

    def __init__(
        self,
        body: Callable[[], None],
        device: torch.device | str,
        *,
        enabled: bool = True,
        pool: _POOL_HANDLE | None = None,
        name: str = "program",
        warmup: int = 2,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup: expected >= 1 eager runs before capture, got {warmup}")
        self.body, self.name = body, name
        self.graph: torch.cuda.CUDAGraph | None = None
        self.fallback_reason = "capture disabled" if not enabled else capture_unavailable(device)
        if self.fallback_reason is None:
            try:
                self.graph = self._capture(torch.device(device), pool, warmup)
            except RuntimeError as exc:
                self.fallback_reason = f"capture failed: {str(exc).splitlines()[0]}"
                log.warning("%s runs eagerly: %s", name, self.fallback_reason)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def _capture(self, device: torch.device, pool: _POOL_HANDLE | None, warmup: int) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.body()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # the garbage collector must not run inside the capture: freeing another object's CUDA graph (or pinned
        # memory) there is an operation capture forbids, and it invalidates this capture
        collect = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=pool):
                self.body()
        finally:
            if collect:
                gc.enable()
        return graph

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.body()

    def __repr__(self) -> str:
        how = "captured" if self.captured else f"eager ({self.fallback_reason})"
        return f"CapturedProgram({self.name}, {how})"
