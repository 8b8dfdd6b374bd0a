"""What :func:`mlbench.probes.tiling.run_tiled` does when a tiled pass runs out of memory.

Kept apart from the pass itself because it is a policy, not tiling: which errors count as out
of memory (``torch.OutOfMemoryError``, or the CPU allocator's "can't allocate memory",
:func:`is_oom`), how memory is given back before a retry (:func:`free_memory`), and the order of
retries (:func:`after_oom`): halve the tiles per forward, then the tile side, down to
``min_tile``; then fall back once to another device (the CPU by default) with the parameters
copied there, at the tile and batch first asked for; then raise :class:`TilingOutOfMemory`.
Every retry is a mark on the memory timeline being recorded (``mb.record_memory``).
"""

from __future__ import annotations

import gc
from typing import NamedTuple

import torch
from torch import nn

from mlbench.errors import MlbenchError
from mlbench.probes.memory import note

__all__ = ["Attempt", "TilingOutOfMemory", "after_oom", "free_memory", "is_oom"]


class TilingOutOfMemory(MlbenchError, MemoryError):
    """Every tile size down to ``min_tile`` (and the CPU fallback) ran out of memory."""


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says memory ran out: ``torch.OutOfMemoryError`` or the CPU allocator's message."""
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc)))


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on a CUDA ``device``, hand cached blocks back before the next try."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except (RuntimeError, AssertionError):  # CPU build of torch
            pass


class Attempt(NamedTuple):
    """One try of the out-of-memory policy: tile side, most tiles per forward, device, and the
    parameters copied to the fallback device (None: the model's own)."""

    tile: int
    batch: int
    device: torch.device
    state: dict | None


def after_oom(model: nn.Module, exc: BaseException, asked: Attempt, failed: Attempt, batch: int, multiple: int,
              min_tile: int, overlap: int, fallback: str | None) -> Attempt:
    """The out-of-memory policy's next try after ``failed`` ran ``batch`` tiles per forward: half the
    batch, else half the tile, else the fallback device (parameters copied there) at the tile and
    batch asked for; raise when nothing is left."""
    current, device = failed.tile, failed.device
    smaller = current // 2 // multiple * multiple
    if batch > 1:
        note(f"out of memory at tile {current}, {batch} per batch, on {device}: retry with {batch // 2} per batch")
        return failed._replace(batch=batch // 2)
    if smaller >= min_tile:
        shrunk = "" if overlap < smaller // 2 else f", overlap {smaller // 4} (was {overlap})"
        note(f"out of memory at tile {current} on {device}: retry at tile {smaller}{shrunk}")
        return failed._replace(tile=smaller)
    if fallback is not None and failed.state is None:
        note(f"out of memory at tile {current} on {device}: fall back to {fallback} at tile {asked.tile}")
        device = torch.device(fallback)
        state = {k: v.detach().to(device, copy=True) for k, v in [*model.named_parameters(), *model.named_buffers()]}
        return asked._replace(device=device, state=state)
    raise TilingOutOfMemory(
        f"out of memory at every tile size from {asked.tile} down to {current} on {device}"
        f"{' and after falling back to ' + fallback if failed.state is not None else ''}; "
        "estimate the need with mb.estimate_memory(model, (1, C, tile, tile)) and free memory, "
        "or use a smaller min_tile."
    ) from exc
