"""The reference side of a module-by-module comparison: ``record_modules(model, x) -> ModuleRecord``.

One forward with every module call recorded (completion order: the producer before the
containers around it): its path and call number, its type, its output's shapes, and what is kept
of its output for :func:`mlbench.studies.module_diff.compare_modules`: every ``stride``-th row
(dim -2) copied, 1/8 of the activations by default, or with ``stride=1`` the output itself.

Why rows and not every value: the small models are memory-bound on a CPU, and reading every
module's output twice more (subtract, reduce) cost 1.5 forwards; with every 8th row, the module
trace of a reference and a variant costs 1.0 to 1.2 times their plain forwards
(``bench/parity.py``). What parity looks for is dense: a cast, a mode, a layout, a thread count or
a changed weight moves every row. A difference confined to a few pixels shows at the first module
where it has spread to a compared row, and always in the final output, which is compared whole.
Both passes ride on :func:`mlbench.probes._hooks.module_calls`, the dispatcher the shape traces use.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cached_property
from typing import Any

import torch
from torch import nn

from mlbench.errors import OptionsError
from mlbench.probes._hooks import CallAround, module_calls, module_paths
from mlbench.probes.accounting import tensors_in
from mlbench.probes.shape_trace import shape_text

__all__ = ["STRIDE", "Key", "ModuleRecord", "record_modules", "rows_of", "walk_forward", "Walk"]

Key = tuple[str, int]
"""A module call: the module's path and which call of it (0 for the first)."""


STRIDE = 8
"""Rows of H compared per module by default: every 8th (see the module's docstring)."""


def _row_layout(tensor: torch.Tensor, stride: int) -> tuple[list[int], list[int]] | None:
    """Size and strides of every ``stride``-th row (dim -2) of ``tensor``; None when it has fewer than
    3 dims or no more rows than ``stride`` (then it is compared whole)."""
    if stride < 2 or tensor.dim() < 3 or tensor.shape[-2] <= stride:
        return None
    size, strides = list(tensor.shape), list(tensor.stride())
    size[-2] = -(-size[-2] // stride)
    strides[-2] *= stride
    return size, strides


def rows_of(tensor: torch.Tensor, stride: int) -> torch.Tensor:
    """Every ``stride``-th row (dim -2) of a tensor with at least 3 dims and more rows than ``stride``,
    as a view (``tensor[..., ::stride, :]``, built without Python's slower indexing); else the tensor.

    >>> rows_of(torch.arange(24.).reshape(1, 6, 4), 4)[0, :, 0].tolist()
    [0.0, 16.0]
    """
    layout = _row_layout(tensor, stride)
    return tensor if layout is None else tensor.as_strided(*layout, tensor.storage_offset())


def _magnitude(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``max |t|`` over the tensors as a float32 0-d tensor (NaN when one holds NaN)."""
    values = [(t if t.is_floating_point() else t.float()).abs().amax().float() for t in tensors if t.numel()]
    if len(values) == 1:
        return values[0]
    return torch.stack(values).max() if values else torch.zeros(())


class Walk:
    """What both passes share: module paths, and the innermost module of the error that ended the forward."""

    def __init__(self, model: nn.Module) -> None:
        self.paths = module_paths(model)
        self.modules: list[nn.Module] = []  # in completion order
        self.raising: BaseException | None = None
        self.failed: nn.Module | None = None

    def raised(self, module: nn.Module, exc: BaseException) -> None:
        if exc is not self.raising:  # the innermost call of a new exception
            self.raising, self.failed = exc, module

    def around(self, visit: Callable[[nn.Module, Any], None]) -> CallAround:
        """The ``around`` for :func:`walk_forward` that both passes use: every module call is made,
        an exception it raises is noted (:meth:`raised`, for :meth:`failure`) and raised on, and a
        call that returns is appended to :attr:`modules` and then handed to ``visit(module, output)``.

        ``nn.Identity`` calls are left out, neither appended nor visited: their output is their
        input, recorded where it was made. One helper, so that the record and the comparison see
        exactly the same calls and align call for call.
        """
        modules, raised = self.modules, self.raised

        def around(module, call, args, kwargs):
            if type(module) is nn.Identity:
                return call(module, *args, **kwargs)
            try:
                out = call(module, *args, **kwargs)
            except BaseException as exc:
                raised(module, exc)
                raise
            modules.append(module)
            visit(module, out)
            return out

        return around

    def keys(self) -> list[Key]:
        counts: dict[nn.Module, int] = {}
        keys = []
        for module in self.modules:
            counts[module] = counts.get(module, -1) + 1
            keys.append((self.paths.get(module, "?"), counts[module]))
        return keys

    def failure(self, error: BaseException | None) -> str | None:
        """The path of the innermost module running when ``error`` was raised, if it came from one."""
        if error is None or error is not self.raising or self.failed is None:
            return None
        return self.paths.get(self.failed, "?")


def walk_forward(model: nn.Module, x: Any, around: Callable, context: AbstractContextManager | None, eval: bool):
    """``model(x)`` with ``around`` on every module call; returns (output, error)."""
    with module_calls(model, around, eval=eval), torch.no_grad(), context or nullcontext():
        try:
            return model(x), None
        except Exception as exc:  # kept: the caller says where it failed
            return None, exc


class ModuleRecord:
    """The reference forward: every module call (completion order), its output tensors and type.

    Attributes
    ----------
    keys : list of (path, call)
    types : list of str
    tensors : list of tuple of Tensor
        Each call's output tensors: every ``stride``-th row copied, or (``stride=1``, or too few
        rows to sample) the forward's own tensor, by reference.
    shapes : list of tuple of torch.Size
        The full shapes of those outputs.
    stride : int
    output : the model's return value (None when it raised)
    error : the exception the forward raised, or None
    failed : path of the innermost module running when it raised, or None
    """

    def __init__(self, walk: Walk, tensors: list[tuple[torch.Tensor, ...]], shapes: list[tuple[torch.Size, ...]],
                 output: Any, error: BaseException | None, stride: int) -> None:
        self.keys = walk.keys()
        self.types = [type(m).__name__ for m in walk.modules]
        self.tensors, self.shapes, self.stride = tensors, shapes, stride
        self.output, self.error, self.failed = output, error, walk.failure(error)
        self.index = {key: i for i, key in enumerate(self.keys)}

    @cached_property
    def scales(self) -> list[float]:
        """``max |output|`` of every call (NaN or Inf when the reference output itself is not finite)."""
        lows, highs, slots, last = [], [], [], None
        for tensors in self.tensors:
            if tensors is not last:  # a container returning its last child's output is measured once
                last = tensors
                if len(tensors) == 1 and tensors[0].is_floating_point() and tensors[0].numel():
                    low, high = torch.aminmax(tensors[0])
                else:
                    high = _magnitude(tensors)
                    low = high.neg()
                lows.append(low)
                highs.append(high)
            slots.append(len(lows) - 1)
        if not lows:
            return []
        values = torch.maximum(torch.stack(highs).float().abs(), torch.stack(lows).float().abs()).cpu().tolist()
        return [values[slot] for slot in slots]

    def shape(self, index: int) -> str:
        """The output shape of call ``index``, as text."""
        shapes = [tuple(s) for s in self.shapes[index]]
        return shape_text(shapes[0] if len(shapes) == 1 else shapes)

    def to(self, device: torch.device) -> "ModuleRecord":
        """A copy whose tensors are on ``device`` (for a variant that runs there); self if they already are."""
        if all(t.device == device for tensors in self.tensors for t in tensors):
            return self
        moved = ModuleRecord.__new__(ModuleRecord)
        moved.__dict__.update(self.__dict__)
        copies: dict[int, torch.Tensor] = {}
        moved.tensors = [tuple(copies.setdefault(id(t), t.to(device)) for t in tensors) for tensors in self.tensors]
        return moved


def record_modules(model: nn.Module, x: Any, *, context: AbstractContextManager | None = None,
                   eval: bool = True, stride: int = STRIDE) -> ModuleRecord:
    """Run ``model(x)`` once (no gradients, eval mode unless ``eval=False``) and record every module call:
    a copy of every ``stride``-th row of its output (:func:`rows_of`), or with ``stride=1`` the
    output itself.

    ``nn.Identity`` calls are left out (216 of the small HRNet's 1,363): their output is their input,
    recorded where it was made. A tensor kept by reference that a later in-place operation changed (``nn.ReLU(inplace=True)``
    after a convolution) no longer holds the module's output: such calls are recorded again, as
    copies, by a second forward.
    """
    if not isinstance(stride, int) or stride < 1:
        raise OptionsError(f"stride must be an int >= 1 (compare every stride-th row), got {stride!r}")

    def run(copy: frozenset[int]) -> tuple[Walk, list, list, list, Any, BaseException | None]:
        walk, tensors, shapes, versions, last = Walk(model), [], [], [], [None, -1, None, None]

        def record(module, out):
            if type(out) is not torch.Tensor:
                found = tuple(tensors_in(out))
                shapes.append(tuple(t.shape for t in found))
                kept = tuple(_kept(t, stride, len(tensors) in copy) for t in found)
                tensors.append(kept)
                versions.append(tuple(t._version for t in kept))
                return
            shapes.append((out.shape,))
            if out is last[0] and out._version == last[1]:  # a container returning its last child's output
                tensors.append(last[2])
                versions.append(last[3])
                return
            kept = (_kept(out, stride, len(tensors) in copy),)
            version = (out._version,) if kept[0] is out else None  # a copy cannot change
            last[:] = out, out._version, kept, version
            tensors.append(kept)
            versions.append(version)

        output, error = walk_forward(model, x, walk.around(record), context, eval)
        return walk, tensors, shapes, versions, output, error

    walk, tensors, shapes, versions, output, error = run(frozenset())
    changed = frozenset(i for i, (kept, seen) in enumerate(zip(tensors, versions))
                        if seen is not None and any(t._version != v for t, v in zip(kept, seen)))
    if changed and error is None:
        walk, tensors, shapes, versions, output, error = run(changed)
    return ModuleRecord(walk, tensors, shapes, output, error, stride)


def _kept(tensor: torch.Tensor, stride: int, copy: bool) -> torch.Tensor:
    """What the record keeps of one output tensor: a copy of its sampled rows, else the tensor itself
    (copied when a later in-place operation is known to change it). No gradients flow here."""
    layout = _row_layout(tensor, stride)
    if layout is not None:
        return torch.as_strided_copy(tensor, *layout, tensor.storage_offset())
    return tensor.clone() if copy else tensor
