"""Predict the peak memory of a forward pass without allocating it: ``estimate_memory``.

The model runs on the ``meta`` device (``torch.func.functional_call`` with meta copies of
its parameters, so the model itself is untouched) while :class:`LiveTensorCounter` counts the
bytes of live tensors after every op. The same count in a real CPU run gives the same
numbers (see ``bench/memory.py``). :func:`max_input_size` uses that the live total after
op *i* is exactly ``a_i + b_i T + c_i T**2`` in the number of input pixels ``T`` (convolution
maps are linear in ``T``, the bottleneck attention quadratic), fitted from three estimates.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mlbench.errors import ModelError, OptionsError
from mlbench.findings import ReportText, format_bytes
from mlbench.models.cards import card, input_multiple
from mlbench.probes._hooks import check_module
from mlbench.probes.accounting import CUDA_BLOCK, DISPATCH_AVAILABLE, LiveTensorCounter, ModuleStack

__all__ = ["MemoryEstimate", "estimate_memory", "max_input_size", "input_shape_of", "format_bytes"]

_GB = 1024**3


@dataclass(frozen=True, repr=False)
class MemoryEstimate(ReportText):
    """Predicted memory of one inference forward pass (no gradients); all sizes in bytes.

    ``peak_bytes = parameter_bytes + input_bytes + activation_peak_bytes``. Not included:
    the CUDA context (~0.3-0.5 GiB, outside ``torch.cuda.max_memory_allocated``), cuDNN and
    cuBLAS workspaces, and allocator caching (reserved > allocated).
    """

    model: str
    input_shape: tuple[int, ...]
    dtype: str
    device: str
    parameter_bytes: int
    input_bytes: int
    activation_peak_bytes: int
    peak_bytes: int
    peak_where: str
    largest_tensor_bytes: int
    largest_tensor_shape: tuple[int, ...]
    largest_tensor_where: str
    output_shape: tuple[int, ...]
    ops: int
    method: str

    def fits(self, budget_bytes: float) -> bool:
        """Whether the predicted peak is at most ``budget_bytes``."""
        return self.peak_bytes <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def text(self) -> str:
        size = "x".join(str(s) for s in self.input_shape)
        return "\n".join([
            f"MemoryEstimate({self.model}, input {size} {self.dtype} on {self.device}; method {self.method})",
            f"  peak             {format_bytes(self.peak_bytes):>10}  in {self.peak_where}",
            f"  parameters       {format_bytes(self.parameter_bytes):>10}",
            f"  input            {format_bytes(self.input_bytes):>10}",
            f"  activations      {format_bytes(self.activation_peak_bytes):>10}  (live at the peak)",
            f"  largest tensor   {format_bytes(self.largest_tensor_bytes):>10}  "
            f"{self.largest_tensor_shape} in {self.largest_tensor_where}",
        ])


def input_shape_of(shape: int | tuple[int, ...] | list[int], channels: int = 3) -> tuple[int, ...]:
    """Normalise ``side``, ``(H, W)``, ``(C, H, W)`` or ``(N, C, H, W)`` to (N, C, H, W)."""
    dims = (shape, shape) if isinstance(shape, int) and not isinstance(shape, bool) else tuple(shape)
    ok = all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims)
    if not ok or len(dims) not in (2, 3, 4):
        raise OptionsError(
            f"input_shape must be a side, (H, W), (C, H, W) or (N, C, H, W) of positive ints, "
            f"got {shape!r}; e.g. input_shape=1024 or (1, 3, 1024, 1024)."
        )
    return ((1, channels) + dims) if len(dims) == 2 else ((1,) + dims if len(dims) == 3 else dims)


def _meta_state(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta tensors shaped like every parameter and buffer (floats cast to ``dtype``)."""
    state = dict(model.named_parameters())
    state.update(model.named_buffers())
    return {
        name: torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="meta")
        for name, t in state.items()
    }


def _run_meta(model: nn.Module, shape: tuple[int, ...], dtype: torch.dtype, round_to: int,
              record: bool = False) -> tuple[LiveTensorCounter, torch.Tensor, str]:
    """Run ``model`` on meta tensors under a counter; returns (counter, output, method)."""
    state = _meta_state(model, dtype)
    x = torch.empty(shape, dtype=dtype, device="meta")
    stack = ModuleStack()
    counter = LiveTensorCounter([x, *state.values()], round_to=round_to, where=stack.top, record=record)
    training = model.training
    model.eval()
    try:
        with stack.track(model, exit=lambda path, output: counter.count_outputs(output)), torch.no_grad():
            if DISPATCH_AVAILABLE:
                with counter:
                    out = torch.func.functional_call(model, state, (x,))
            else:  # pragma: no cover - only without the private dispatch API
                out = torch.func.functional_call(model, state, (x,))
    finally:
        model.train(training)
    return counter, out, "meta + dispatch" if DISPATCH_AVAILABLE else "meta + module hooks (approximate)"


def _forward_failed(model: nn.Module, shape: tuple[int, ...], exc: Exception) -> ModelError:
    from mlbench.failures.forward_errors import explain_error

    explanation = explain_error(exc, model=model, input_shape=shape)
    return ModelError(
        f"cannot estimate memory: the forward pass of {_name(model)} fails for input {shape}: "
        f"{type(exc).__name__}: {exc}\n{explanation!r}"
    )


def _refuse_scripted(model: nn.Module) -> None:
    """A TorchScript module cannot run on the meta device, which the estimates need."""
    if isinstance(model, torch.jit.ScriptModule):
        raise OptionsError(f"{type(model).__name__} is a TorchScript module; memory is estimated by running the "
                           "model on the meta device, which TorchScript cannot: pass the plain nn.Module it was "
                           "scripted or traced from (mb.load_model(weights, model=MyModel()))")


def _name(model: nn.Module) -> str:
    return card(model).name


def _round_to(device: str | torch.device) -> int:
    return CUDA_BLOCK if torch.device(device).type == "cuda" else 1


def estimate_memory(
    model: nn.Module,
    input_shape: int | tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cuda",
) -> MemoryEstimate:
    """Predict the peak memory of ``model(x)`` in inference, allocating nothing.

    Parameters
    ----------
    model : nn.Module
        Any model, on any device (also ``meta``: ``mb.build_model(name, "full", device="meta")``).
        It is not modified; its parameters are replaced by meta tensors for the count.
    input_shape : int or tuple of int
        Square side, (H, W), (C, H, W) or (N, C, H, W); channels default to the model card's (3 unless
        the card or the model's first convolution says 1), batch to 1.
    dtype : torch.dtype
        Dtype of the input and of the floating-point parameters.
    device : str or torch.device
        Where the forward would run; ``"cuda"`` rounds every tensor up to 512 bytes as the
        caching allocator does.

    Returns
    -------
    MemoryEstimate
        Peak, parameters, input, activations, largest tensor and where the peak happens.

    Raises
    ------
    ModelError
        If the forward pass fails for this shape (the message explains why, e.g. a side that is
        not a multiple of the model's stride).

    Examples
    --------
    The full-size MA-ResUNet at the service's 1024 px, built on the meta device (nothing allocated):

    >>> import mlbench as mb
    >>> from mlbench.findings import format_bytes
    >>> estimate = estimate_memory(mb.build_model("ma_resunet", "full", device="meta"), 1024)
    >>> format_bytes(estimate.peak_bytes), estimate.peak_where
    ('1.45 GiB', 'decoder1.1.attention.stage2')
    """
    model = check_module(model)
    _refuse_scripted(model)
    shape = input_shape_of(input_shape, card(model).channels)
    round_to = _round_to(device)
    try:
        counter, out, method = _run_meta(model, shape, dtype, round_to)
    except Exception as exc:  # every failure is explained and re-raised
        raise _forward_failed(model, shape, exc) from exc
    params = sum(_rounded(t.numel() * t.element_size(), round_to) for t in _meta_state(model, dtype).values())
    x_bytes = _rounded(math.prod(shape) * torch.empty((), dtype=dtype).element_size(), round_to)
    largest = counter.largest
    return MemoryEstimate(
        model=_name(model), input_shape=shape, dtype=str(dtype).replace("torch.", ""),
        device=str(torch.device(device)), parameter_bytes=params, input_bytes=x_bytes,
        activation_peak_bytes=counter.peak, peak_bytes=params + x_bytes + counter.peak,
        peak_where=counter.peak_where, largest_tensor_bytes=largest[0],
        largest_tensor_shape=largest[1], largest_tensor_where=largest[2],
        output_shape=tuple(out.shape) if isinstance(out, torch.Tensor) else (), ops=counter.ops, method=method,
    )


def _rounded(nbytes: int, round_to: int) -> int:
    return int(math.ceil(nbytes / round_to) * round_to)


_FITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fitted_peak(model: nn.Module, channels: int, dtype: torch.dtype, device: str | torch.device,
                 base: int) -> Any:
    """Cached :func:`_fit_peak` (per model, channels, dtype and allocator rounding)."""
    key = (channels, dtype, _round_to(device), base)
    cache = _FITS.setdefault(model, {})
    if key not in cache:
        cache[key] = _fit_peak(model, channels, dtype, device, base)
    return cache[key]


def _fit_peak(model: nn.Module, channels: int, dtype: torch.dtype, device: str | torch.device,
              base: int) -> Any:
    """Fit the live total after every op as ``a + b T + c T**2`` from three meta runs.

    Returns a function side -> predicted peak bytes, or None when the runs differ in their
    op sequence (data-dependent control flow) or one of them fails (a model that takes one size
    only), in which case callers search with estimates (whose failure is explained).
    """
    start = max(2, math.ceil(getattr(model, "min_input_size", 1) / base))
    sides = [base * k for k in (start, start + 1, start + 2)]
    curves = []
    for side in sides:
        try:
            counter, _, _ = _run_meta(model, (1, channels, side, side), dtype, _round_to(device), record=True)
        except Exception:
            return None
        curves.append(counter.curve)
    if len({len(curve) for curve in curves}) != 1 or not curves[0]:
        return None
    tokens = np.array([float(side * side) for side in sides])
    vander = np.stack([np.ones(3), tokens, tokens**2], axis=1)
    coefficients = np.linalg.solve(vander, np.array(curves, dtype=np.float64))
    params = sum(t.numel() * t.element_size() for t in _meta_state(model, dtype).values())
    item = torch.empty((), dtype=dtype).element_size()

    def peak(side: int) -> float:
        t = float(side) * side
        return params + channels * t * item + float(np.max(np.array([1.0, t, t * t]) @ coefficients))

    return peak


def max_input_size(
    model: nn.Module,
    budget_bytes: float,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cuda",
    channels: int | None = None,
    max_side: int = 65536,
) -> int:
    """The largest square side (a multiple of ``model.input_multiple``) whose forward fits.

    Parameters
    ----------
    model : nn.Module
        The model (``meta`` is fine); ``input_multiple`` and ``min_input_size`` are respected.
    budget_bytes : float
        Memory available to the forward pass, in bytes (e.g. ``8 * 1024**3``).
    dtype, device : see :func:`estimate_memory`.
    channels : int, optional
        Input channels; default the model card's.
    max_side : int
        Upper end of the search.

    Returns
    -------
    int
        The side ``S`` such that (1, C, S, S) fits and (1, C, S + multiple, S + multiple) does not
        (checked with :func:`estimate_memory` at the answer).

    Raises
    ------
    OptionsError
        If the budget is not positive or too small for the smallest input the model accepts.
    """
    model = check_module(model)
    _refuse_scripted(model)
    if not isinstance(budget_bytes, (int, float)) or budget_bytes <= 0:
        raise OptionsError(f"budget_bytes must be a positive number of bytes, got {budget_bytes!r}; "
                           "e.g. 8 * 1024**3 for an 8 GiB GPU.")
    model_card = card(model)
    channels = model_card.channels if channels is None else channels
    multiple = input_multiple(model)
    low = multiple * math.ceil(max(getattr(model, "min_input_size", 1), model_card.min_input_size, multiple) / multiple)
    fitted = _fitted_peak(model, channels, dtype, device, math.lcm(multiple, 32))

    def fits(side: int, budget: float = budget_bytes) -> bool:
        if fitted is not None:
            return fitted(side) <= budget
        return estimate_memory(model, (1, channels, side, side), dtype, device).fits(budget)

    if not fits(low):
        need = estimate_memory(model, (1, channels, low, low), dtype, device).peak_bytes
        raise OptionsError(
            f"a budget of {format_bytes(budget_bytes)} is below what the smallest input "
            f"{low}x{low} of {_name(model)} needs ({format_bytes(need)}); "
            "give more memory, a smaller dtype or a smaller model."
        )
    side = _largest(lambda s: fits(s), low, max_side, multiple)
    for _ in range(8):  # check the answer; a side off the fitted grid may need a little more
        actual = estimate_memory(model, (1, channels, side, side), dtype, device).peak_bytes
        if actual <= budget_bytes or side <= low:
            break
        scale = actual / fitted(side) if fitted is not None else 1.0
        side = min(side - multiple, _largest(lambda s: fits(s, budget_bytes / scale), low, max_side, multiple))
    return side


def _largest(fits: Any, low: int, high: int, multiple: int) -> int:
    """Binary search: the largest multiple of ``multiple`` in [low, high] with ``fits(side)``."""
    lo, hi = low // multiple, max(low, high) // multiple
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * multiple) else (lo, mid - 1)
    return lo * multiple
