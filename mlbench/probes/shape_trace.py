"""The record of one traced forward pass: :class:`ShapeTrace` and its rows, :class:`ModuleCall`.

:func:`mlbench.probes.trace_shapes` fills a trace with raw records, one plain list per module call
(laid out by the constants below), because building them must cost little inside the forward; the
trace turns them into frozen :class:`ModuleCall` rows, with paths, parameter counts and shape
texts, only when they are first read. It also explains what it saw: the failure, the first NaN or
Inf, or a silent change of size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from mlbench.findings import ReportText
from mlbench.models.cards import card
from mlbench.probes._hooks import module_paths
from mlbench.probes._values import stat_fields
from mlbench.probes.accounting import tensors_in
from mlbench.failures.forward_errors import Explanation, explain_error, explain_output_size

__all__ = ["ModuleCall", "ShapeTrace", "shape_of", "shape_text"]


def shape_of(value: Any) -> Any:
    """Shapes inside ``value``: a tensor -> tuple; tuple/list -> list of those; dict -> dict; else the type name."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return [shape_of(item) for item in value]
    if isinstance(value, dict):
        return {key: shape_of(item) for key, item in value.items()}
    return type(value).__name__


def shape_text(shapes: Any) -> str:
    """``shape_of``'s result as compact text: ``(1, 2, 32, 32)``, ``{out: (1, 2, 32, 32), aux: ()}``."""
    if isinstance(shapes, list):
        return ", ".join(shape_text(s) for s in shapes) if len(shapes) != 1 else shape_text(shapes[0])
    if isinstance(shapes, dict):
        return "{" + ", ".join(f"{k}: {shape_text(v)}" for k, v in shapes.items()) + "}"
    return str(shapes).replace(",)", ")")


@dataclass(frozen=True)
class ModuleCall:
    """One call of one module, in the order the calls started.

    ``status`` is "ok"; "failed" for the innermost call of the error that ended the forward
    (where it happened) and "raised through" for the calls it passed on its way out; or "raised,
    caught" for a call whose exception the model caught itself (a fallback path). ``min`` and
    ``max`` (over the finite values) and the ``nan`` and ``inf`` counts are exact; ``mean`` only with
    ``stats="full"``; all are None with ``stats=False``, for an output without floating values, and
    with the default statistics for a leaf module's output (``stats="every"`` measures those too).
    """

    index: int
    path: str
    type: str
    depth: int
    inputs: str
    outputs: str
    dtype: str
    device: str
    parameters: int
    seconds: float
    status: str
    finished: int = -1
    min: float | None = None
    max: float | None = None
    mean: float | None = None
    nan: int | None = None
    inf: int | None = None


# One module call on record, a plain list (the cheapest record to build 1,255 times per small
# HRNet forward); shapes stay torch.Size and dtype/device objects until the trace is frozen.
# _FAILURE numbers the exception a call raised (0: none), to tell the one that ended the forward
# from those the model caught itself.
(_MODULE, _START, _INPUTS, _SECONDS, _FINISHED, _OUTPUTS, _DTYPE, _DEVICE, _STATS, _STATUS,
 _FAILURE) = range(11)


class ShapeTrace(ReportText):
    """The record of one forward pass, module by module; the repr is a readable summary.

    Attributes
    ----------
    calls : tuple of ModuleCall
    input_shape : tuple of int
    output_shape : tuple of int or None
        The output's shape; for a tuple, list or dict output (torchvision's ``{"out": ..., "aux": ...}``)
        the shape of its first (N, C, H, W) tensor, the map compared with the input's size; None
        when there is none (or the forward failed). ``output_shapes`` has every shape inside.
    error : BaseException or None
        The exception the forward raised (the trace keeps it instead of raising).
    failed : ModuleCall or None
        The innermost module that was running when the error was raised.
    statistics : str
        Which outputs have statistics: "blocks" (the default's outputs of modules that hold others,
        and the model's), "every module", "every module, with the mean" or "none".
    passes : int
        2 when the default statistics saw a NaN or Inf and a second forward measured every module.
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, calls: list[list[Any]],
                 output: Any, error: BaseException | None, operands: tuple[str, ...]) -> None:
        self._model = model  # its card is read on first use: summing the parameters costs ~3% of a small forward
        self._raw = (model, calls)  # frozen into ModuleCall records on first use, not inside the timed trace
        self.input_shape = tuple(x.shape)
        self.input_dtype = str(x.dtype).replace("torch.", "")
        main = output if isinstance(output, torch.Tensor) else next(
            (t for t in tensors_in(output) if t.dim() == 4), None)
        self.output_shape = tuple(main.shape) if main is not None else None
        self.output_shapes = shape_of(output) if output is not None else None
        self.error = error
        self.operands = operands
        self.input_nonfinite = 0
        self.nonfinite_parameters: dict[str, int] = {}
        self.hidden_nonfinite: tuple[str, ...] = ()  # leaves (a Sigmoid, a clamp...) whose input held NaN/Inf
        self.statistics = "none"  # which outputs have min/max/NaN/Inf: "blocks", "every module", ...
        self.passes = 1  # 2 when the default statistics saw NaN/Inf and a second pass measured every module
        self._alarm = False

    @cached_property
    def _facts(self) -> SimpleNamespace:
        about = card(self._model)
        return SimpleNamespace(name=about.name, input_multiple=about.input_multiple,
                               min_input_size=about.min_input_size)

    @property
    def model_name(self) -> str:
        """The model's name, from its card."""
        return self._facts.name

    @cached_property
    def calls(self) -> tuple[ModuleCall, ...]:
        """Every module call, in the order the calls started."""
        calls = _freeze(*self._raw)
        self._raw = None
        return calls

    @cached_property
    def failed(self) -> ModuleCall | None:
        """The innermost module that was running when the error was raised."""
        failed = [c for c in self.calls if c.status == "failed"]
        return failed[-1] if failed else None

    @property
    def ok(self) -> bool:
        """True when the forward pass finished."""
        return self.error is None

    @property
    def table(self):
        """A pandas DataFrame, one row per module call (columns as :class:`ModuleCall`)."""
        import pandas as pd

        return pd.DataFrame([asdict(c) for c in self.calls]).set_index("index")

    @property
    def first_nonfinite(self) -> ModuleCall | None:
        """The module whose output held NaN or Inf first (in completion order: the producer)."""
        bad = [c for c in self.calls if c.status == "ok" and (c.nan or 0) + (c.inf or 0) > 0]
        return min(bad, key=lambda c: c.finished) if bad else None

    def explain(self) -> Explanation:
        """Explain the failure, the first NaN/Inf, or a silent size change; else say all is well."""
        facts = self._facts
        if self.error is not None:
            where = f"{self.failed.path} ({self.failed.type})" if self.failed else ""
            return explain_error(self.error, model=facts, input_shape=self.input_shape,
                                 input_dtype=self.input_dtype, module=where, operands=self.operands)
        nonfinite = _explain_nonfinite(self)
        if nonfinite is not None:
            return nonfinite
        resized = explain_output_size(facts, self.input_shape, self.output_shape or ())
        if resized is not None:
            return resized
        compared = (len(self.input_shape) == 4 and self.output_shape is not None and len(self.output_shape) == 4)
        values = {"none": "values not measured", "blocks": "all block outputs finite"}.get(self.statistics,
                                                                                           "all outputs finite")
        return Explanation("ok", f"{self.model_name}: {self.input_shape} -> {shape_text(self.output_shapes)}, "
                           f"{values}, " + ("output size matches the input" if compared else
                                                     "no (N, C, H, W) output to compare with the input's size"))

    def text(self) -> str:
        status = "ok" if self.ok else f"FAILED in {self.failed.path if self.failed else '?'}: {type(self.error).__name__}"
        lines = [f"ShapeTrace({self.model_name}, input {self.input_shape} {self.input_dtype}, "
                 f"{len(self.calls)} module calls, {status})", "  values: " + _VALUES_NOTE.get(
                     self.statistics, f"min/max/NaN/Inf of {self.statistics}")
                 + (" (a second pass: NaN/Inf was found)" if self.passes == 2 else "")]
        top = [c for c in self.calls if c.depth <= 1]
        for call in top[:40]:
            flag = "" if call.status == "ok" else f"  <- {call.status}"
            lines.append(f"  {call.path:<24} {call.type:<22} {call.inputs:<28} -> {call.outputs}{flag}")
        if len(top) > 40:
            lines.append(f"  ... {len(top) - 40} more; see .table")
        if self.failed is not None and self.failed.depth > 1:
            lines.append(f"  failed module: {self.failed.path} ({self.failed.type}) with inputs {self.failed.inputs}")
        return "\n".join(lines)


_VALUES_NOTE = {"none": "not measured", "blocks": "min/max/NaN/Inf of block outputs; stats='every' for every module"}


def _explain_nonfinite(trace: ShapeTrace) -> Explanation | None:
    call = trace.first_nonfinite
    if call is None and trace.hidden_nonfinite:
        where = trace.hidden_nonfinite[0]
        return Explanation(
            "nan_output", f"{where} received NaN/Inf and hid it: no module's output holds one",
            (f"input of {where} held NaN/Inf; every measured output is finite",
             f"input {trace.input_shape} {trace.input_dtype}"),
            "the input already held them" if trace.input_nonfinite else
            "the model's own code (a forward, not a module) made them, and a saturating module turned them into "
            "finite values, so the output looks fine while the values it saw were not",
            "find the operation in the forward that feeds it (an overflow in float16, a division by ~0, a log of 0) "
            "and clamp or add an eps there", where)
    if call is None:
        return None
    bad_params = trace.nonfinite_parameters.get(call.path, 0)
    if trace.input_nonfinite:
        cause = f"the input already held {trace.input_nonfinite} non-finite value(s)"
        fix = "clean the input (np.nan_to_num, or fix the decoder/normalisation that made them)"
    elif bad_params:
        cause = f"its own parameters hold {bad_params} non-finite value(s): the weights are corrupt"
        fix = "reload the checkpoint (mb.check_weights) or retrain; torch.isfinite(p).all() for every parameter"
    else:
        cause = "its inputs and weights were finite: its arithmetic overflowed (float16?) or divided by ~0"
        fix = "run in float32, clamp the input range, or add an eps where the module divides"
    return Explanation(
        "nan_output", f"{call.path} ({call.type}) is the first module whose output holds NaN/Inf",
        (f"{call.path}: {call.nan} NaN, {call.inf} Inf in output {call.outputs}",
         f"input {trace.input_shape} {trace.input_dtype}"), cause, fix, call.path)


def _parameter_counts(model: nn.Module) -> dict[nn.Module, int]:
    """Parameters of every submodule, recursive, in one pass (shared parameters counted once per module)."""
    counts: dict[nn.Module, int] = {}

    def visit(module: nn.Module) -> int:
        if module not in counts:
            own = sum(p.numel() for p in module._parameters.values() if p is not None)
            counts[module] = own + sum(visit(child) for child in module.children())
        return counts[module]

    visit(model)
    return counts


def _plain_output(shapes: Any) -> Any:
    """A recorded output shape as frozen: the torch.Size of a one-tensor output -> tuple."""
    return tuple(shapes) if type(shapes) is torch.Size else shapes


def _plain_inputs(shapes: Any) -> Any:
    """Recorded input shapes as frozen: the torch.Size of a one-tensor call -> [tuple], one per argument."""
    return [tuple(shapes)] if type(shapes) is torch.Size else shapes


def _freeze(model: nn.Module, calls: list[list[Any]]) -> tuple[ModuleCall, ...]:
    counts, paths = _parameter_counts(model), module_paths(model)
    frozen = []
    for index, call in enumerate(calls):
        module, path = call[_MODULE], paths.get(call[_MODULE], "?")
        frozen.append(ModuleCall(
            index=index, path=path, type=type(module).__name__, depth=0 if path == "(model)" else path.count(".") + 1,
            inputs=shape_text(_plain_inputs(call[_INPUTS])),
            outputs=shape_text(_plain_output(call[_OUTPUTS])), dtype=str(call[_DTYPE]).replace("torch.", ""),
            device=str(call[_DEVICE]), parameters=counts.get(module, 0), seconds=round(call[_SECONDS], 6),
            status=call[_STATUS], finished=call[_FINISHED], **stat_fields(call[_STATS])))
    return tuple(frozen)
