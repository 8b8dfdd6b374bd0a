"""Counting the bytes of live tensors, op by op, on any device (CPU, CUDA or ``meta``).

:class:`LiveTensorCounter` is a ``TorchDispatchMode``: every aten op's outputs are looked at;
a storage not seen before is added to the live total and a weak-reference finaliser takes it
off when the storage dies. Views and in-place results share a storage and are not counted
twice; storages that existed before (parameters, the input) are ignored. On the ``meta``
device nothing is allocated, so the same count predicts a forward pass without running it.

``TorchDispatchMode`` lives in a private module (``torch.utils._python_dispatch``); when it
cannot be imported, :data:`DISPATCH_AVAILABLE` is False and callers fall back to counting
module outputs with hooks (which misses functional ops between modules).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

try:  # private API: guarded, with a hook-based fallback in the callers
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    DISPATCH_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the torch build
    TorchDispatchMode = object  # type: ignore[assignment,misc]
    DISPATCH_AVAILABLE = False

from mlbench.probes._hooks import module_calls, module_paths

CUDA_BLOCK = 512
"""The CUDA caching allocator rounds every allocation up to a multiple of 512 bytes."""


def storage_key(tensor: torch.Tensor) -> int:
    """An id of the tensor's storage, shared by all its views."""
    return tensor.untyped_storage()._cdata


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor inside ``value`` (nested tuples, lists and dicts), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    return []


class LiveTensorCounter(TorchDispatchMode):
    """Track bytes of live tensor storages created while the mode is active.

    Parameters
    ----------
    ignore : iterable of Tensor
        Tensors that exist already (parameters, input); their storages are never counted.
    round_to : int
        Round each storage up to a multiple of this (512 mimics the CUDA allocator).
    where : callable, optional
        Returns a label of the current place (module path); recorded at the peak and for
        the largest tensor.
    record : bool
        Keep the live total after every op in :attr:`curve`.
    """

    def __init__(
        self,
        ignore: Iterable[torch.Tensor] = (),
        *,
        round_to: int = 1,
        where: Callable[[], str] | None = None,
        record: bool = False,
    ) -> None:
        super().__init__()
        self.ignored = {storage_key(t) for t in ignore}
        self.live: dict[int, int] = {}
        self.round_to = max(1, int(round_to))
        self.where = where or (lambda: "")
        self.record = record
        self.current = 0
        self.peak = 0
        self.peak_where = ""
        self.largest: tuple[int, tuple[int, ...], str] = (0, (), "")
        self.interval_peak = 0
        self.ops = 0
        self.curve: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        if self.record:
            self.curve.append(self.current)
        return out

    def count_outputs(self, output: Any) -> None:
        """At a module's exit, count the tensors in its output when the dispatch API is missing (an
        approximation); with the API every tensor is already counted as it is made, so nothing."""
        if not DISPATCH_AVAILABLE:  # pragma: no cover - depends on the torch build
            for tensor in tensors_in(output):
                self.track(tensor)

    def track(self, tensor: torch.Tensor) -> None:
        """Count ``tensor``'s storage if it is new (also usable without the mode, from hooks)."""
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.ignored:
            return
        nbytes = int(math.ceil(storage.nbytes() / self.round_to) * self.round_to)
        self.live[key] = nbytes
        self.current += nbytes
        weakref.finalize(storage, self._release, key)
        if nbytes > self.largest[0]:
            self.largest = (nbytes, tuple(tensor.shape), self.where())
        self.interval_peak = max(self.interval_peak, self.current)
        if self.current > self.peak:
            self.peak = self.current
            self.peak_where = self.where()

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def take_interval_peak(self) -> int:
        """Return the peak since the last call and start a new interval at the current total."""
        peak, self.interval_peak = max(self.interval_peak, self.current), self.current
        return peak


class ModuleStack:
    """The path of the innermost running module of a model, kept while :meth:`track` is active."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    @contextmanager
    def track(self, model: nn.Module, enter: Callable[[str], None] | None = None,
              exit: Callable[[str, Any], None] | None = None) -> Iterator["ModuleStack"]:
        """Keep the stack over every submodule call of ``model`` while the block runs: ``enter(path)``
        once a call is pushed, ``exit(path, output)`` before it is popped. A call that raises is
        popped too (without ``exit``), so a fast path that fails and is caught by the model leaves
        nothing stale behind for what its fallback allocates."""
        paths, stack = module_paths(model), self.paths

        def around(module: nn.Module, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            path = paths[module]
            stack.append(path)
            try:
                if enter is not None:
                    enter(path)
                output = call(module, *args, **kwargs)
                if exit is not None:
                    exit(path, output)
                return output
            finally:
                stack.pop()

        with module_calls(model, around):
            yield self

    def top(self) -> str:
        return self.paths[-1] if self.paths else "(outside modules)"


class MemoryBudget(LiveTensorCounter):
    """A :class:`LiveTensorCounter` that raises ``torch.OutOfMemoryError`` past ``budget_bytes``.

    Simulates a device with that much free memory on any machine (CPU, ``meta``), so the
    out-of-memory policy of ``predict_tiled`` can be exercised without a GPU. The op whose
    output crosses the budget raises; the tensors it made are freed with the exception.
    """

    def __init__(self, budget_bytes: int, ignore: Iterable[torch.Tensor] = ()) -> None:
        super().__init__(ignore)
        self.budget = int(budget_bytes)

    def track(self, tensor: torch.Tensor) -> None:
        before = self.current
        super().track(tensor)
        if self.current > self.budget:
            asked = self.current - before
            raise torch.OutOfMemoryError(
                f"simulated out of memory: tried to allocate {asked / 2**20:.2f} MiB with "
                f"{before / 2**20:.2f} MiB of a {self.budget / 2**20:.2f} MiB budget in use")
