"""Small stand-in models for testing the service: fast, slow, or failing on demand.

They map (N, 3, H, W) to (N, 1, H, W) logits (bright pixels are foreground), so the
whole pipeline runs on them. ``SlowModel`` sleeps in many short layers, so a cancelled
run stops at the next layer (``steps=1``: one long layer nothing can stop but a kill);
``FlakyModel`` raises while its ``failing`` flag is set; ``DyingModel`` ends its process.
All pickle, so worker processes can load them.
"""

from __future__ import annotations

import threading
import time

import torch
from torch import nn

__all__ = ["BrightModel", "SlowModel", "FlakyModel", "DyingModel", "HungryModel", "make_png"]


class BrightModel(nn.Module):
    """Logits ``gain * (mean over channels - 0.5)``: instant, deterministic, no weights to train."""

    mlbench_name = "bright"

    def __init__(self, gain: float = 20.0) -> None:
        super().__init__()
        self.gain = gain
        self.scale = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1, H, W)."""
        return self.scale(self.gain * (x.mean(dim=1, keepdim=True) - x.mean()))


class _Sleep(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class SlowModel(nn.Module):
    """A :class:`BrightModel` that first sleeps ``seconds`` in ``steps`` layers."""

    mlbench_name = "slow"

    def __init__(self, seconds: float = 1.0, steps: int = 20) -> None:
        super().__init__()
        self.seconds = seconds
        self.layers = nn.Sequential(*[_Sleep(seconds / steps) for _ in range(steps)])
        self.head = BrightModel()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1, H, W) after ``seconds``."""
        self.calls += 1
        return self.head(self.layers(x))


class FlakyModel(nn.Module):
    """A :class:`BrightModel` that raises ``RuntimeError`` while ``failing`` is True.

    ``failing`` may be a bool or a set of call numbers (1-based) that fail.
    """

    mlbench_name = "flaky"

    def __init__(self, failing: bool | set[int] = False, seconds: float = 0.0) -> None:
        super().__init__()
        self.failing, self.seconds = failing, seconds
        self.head = BrightModel()
        self.calls = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for worker processes: the lock is made anew
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, 1, H, W), or RuntimeError on a failing call."""
        with self._lock:
            self.calls += 1
            call = self.calls
        if self.seconds:
            time.sleep(self.seconds)
        fails = call in self.failing if isinstance(self.failing, set) else bool(self.failing)
        if fails:
            raise RuntimeError(f"injected failure on call {call} (FlakyModel)")
        return self.head(x)


class DyingModel(nn.Module):
    """Ends its whole process on the first forward (``os._exit``): a crash or an out-of-memory kill.

    Only for worker processes (``executor="process"``), where the service survives it.
    """

    mlbench_name = "dying"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Never returns."""
        import os

        os._exit(3)


class HungryModel(BrightModel):
    """Asks for ``gib`` GiB on every forward (filled, so the pages are touched), then answers as
    :class:`BrightModel`: a request that needs more memory than a worker may allocate
    (``worker_memory_bytes``)."""

    mlbench_name = "hungry"

    def __init__(self, gib: float = 8.0) -> None:
        super().__init__()
        self.gib = gib

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Allocates, then (N, 3, H, W) -> (N, 1, H, W) as BrightModel."""
        torch.ones(int(self.gib * (1 << 30)), dtype=torch.uint8)
        return super().forward(x)


def make_png(side: int = 96, n: int = 3, seed: int = 0) -> bytes:
    """An 8-bit PNG of synthetic spheroids (``side`` x ``side``), for requests in tests and demos."""
    import io

    import numpy as np
    from PIL import Image

    from mlbench.samples.synthetic import make_spheroids

    image, _ = make_spheroids((side, side), n, np.random.default_rng(seed))
    buffer = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()
