"""Shape traces of a forward pass: ``trace_shapes(model, x) -> ShapeTrace``.

A call around every submodule (:mod:`mlbench.probes._hooks`) records the module path and type,
the shapes of its inputs and outputs (nested tuples, lists and dicts too), dtype, device,
parameter count, time and statistics of the values: by default the exact min/max of the blocks'
outputs, and where NaN or Inf first appeared (a second pass finds the module when there is one);
``stats="every"`` measures every module's output, ``"full"`` adds the mean (see
:mod:`mlbench.probes._values` for what each costs). Each module is on record before it runs, so
when the forward raises, the trace knows which module failed and with which operands. The trace
itself, its rows and its explanations are in :mod:`mlbench.probes.shape_trace`. Hooks are removed
and ``model.training`` restored in any case.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

import torch
from torch import nn

from mlbench.probes._hooks import check_module, module_calls, module_paths
from mlbench.probes._values import CLAMPS, PASS_NONFINITE, OutputValues, nonfinite, stats_of
from mlbench.probes.accounting import tensors_in
from mlbench.probes.shape_trace import (_DEVICE, _DTYPE, _FAILURE, _FINISHED, _INPUTS, _MODULE, _OUTPUTS, _SECONDS,
                                        _START, _STATS, _STATUS, ModuleCall, ShapeTrace, _plain_inputs, shape_of,
                                        shape_text)

__all__ = ["ModuleCall", "ShapeTrace", "trace_shapes", "shape_of", "shape_text"]


class _Recorder:
    __slots__ = ("values", "calls", "finished", "raising", "failures")

    def __init__(self, values: OutputValues | None) -> None:
        self.values = values  # None without statistics
        self.calls: list[list[Any]] = []
        self.finished = 0
        self.raising: BaseException | None = None  # the exception propagating now, if any
        self.failures = 0

    def around(self, module: nn.Module, call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        first = args[0] if len(args) == 1 else None
        record = [module, perf_counter(), first.shape if type(first) is torch.Tensor else shape_of(list(args)),
                  0.0, -1, "", "", "", None, "running", 0]
        self.calls.append(record)
        values, given = self.values, None
        if values is not None:
            measured = values.every or module._modules or module is values.root
            if values.every and type(module) in CLAMPS:
                given = values.before(module, args)
            if not module._modules and type(module) not in PASS_NONFINITE:  # a leaf that may hide NaN/Inf
                values.watch(module, (*args, *kwargs.values()) if kwargs else args)
        try:
            output = call(module, *args, **kwargs)
        except BaseException as exc:  # noted and re-raised: the model may catch it, the trace decides at the end
            record[_SECONDS] = perf_counter() - record[_START]
            if exc is not self.raising:  # the innermost call of a new exception
                self.raising, self.failures = exc, self.failures + 1
                record[_STATUS] = "failed"
            else:
                record[_STATUS] = "raised through"
            record[_FAILURE] = self.failures
            raise
        record[_SECONDS], record[_FINISHED], record[_STATUS] = perf_counter() - record[_START], self.finished, "ok"
        self.finished += 1
        if type(output) is torch.Tensor:
            record[_OUTPUTS], record[_DTYPE], record[_DEVICE] = output.shape, output.dtype, output.device
            if values is not None and measured:
                record[_STATS] = values.of(module, output, given)
            return output
        tensors = tensors_in(output)
        record[_OUTPUTS] = shape_of(output)
        if tensors:
            record[_DTYPE], record[_DEVICE] = tensors[0].dtype, tensors[0].device
        if values is not None and measured:
            record[_STATS] = stats_of(tensors, values.mean)
        return output

    def settle(self, error: BaseException | None) -> list[Any] | None:
        """After the forward: calls whose exception the model caught say so; the innermost call of
        ``error`` (the exception that ended the forward), if any, is returned."""
        final = self.failures if error is not None and error is self.raising else -1
        innermost = None
        for record in self.calls:
            if record[_FAILURE] and record[_FAILURE] != final:
                record[_STATUS] = "raised, caught"
            elif record[_FAILURE] and record[_STATUS] == "failed":
                innermost = record
        return innermost


def trace_shapes(model: nn.Module, x: torch.Tensor, *, stats: bool | str = True, eval: bool = True) -> ShapeTrace:
    """Run ``model(x)`` with a call around every submodule and return the trace (a second run only
    when the default statistics saw a NaN or Inf, to name the module that made it).

    Parameters
    ----------
    model : nn.Module
        Any model; it is not changed (hooks removed and ``training`` restored afterwards).
    x : Tensor
        The input, usually (N, C, H, W).
    stats : True, "every", "full" or False
        True (the default): the exact min and max of what NaN or Inf would pass through on its way
        out: the outputs of modules that hold other modules, the model's output, and the inputs of
        leaf modules that could hide a NaN or Inf (a Sigmoid, a clamp, a custom module; see
        :data:`mlbench.probes._values.PASS_NONFINITE`). Other leaves' rows have no statistics. When
        any of these values, or the input, is NaN or Inf, the forward runs a second time with
        ``"every"`` (same random state) and that trace is returned: it names the module that made
        the first NaN or Inf, with exact counts (``.passes`` is then 2). It misses only a value that a
        block hides before its own output (a -Inf that a ReLU turns into 0, a NaN its code drops).
        With ``eval=False`` (the forward may change the model or draw random numbers) True means
        ``"every"``. "every": the same for every module's output, about one ``aminmax`` pass per
        new output tensor. "full": "every" plus the exact mean, one ``sum`` pass more. False:
        shapes, dtypes, devices and times only, the cheapest.
    eval : bool
        Run in eval mode (dropout off), under ``torch.no_grad()``.

    Returns
    -------
    ShapeTrace
        Never raises for a failing forward: the error is kept in ``.error`` and explained by
        ``.explain()``. ``.statistics`` says which outputs were measured.

    Examples
    --------
    MA-ResUNet refuses a side that is not a multiple of 16; the trace names the module:

    >>> import mlbench as mb
    >>> trace = trace_shapes(mb.build_model("ma_resunet"), torch.rand(1, 3, 100, 100))
    >>> trace.ok, trace.failed.path, trace.failed.inputs
    (False, 'att3', '(1, 48, 24, 24), (1, 48, 25, 25)')
    """
    model = check_module(model)
    if not isinstance(x, torch.Tensor):
        from mlbench.errors import OptionsError

        raise OptionsError(f"x must be a torch.Tensor of shape (N, C, H, W), got {type(x).__name__}; "
                           "convert an image with torch.from_numpy(image).permute(2, 0, 1)[None].float().")
    if stats not in (True, False, "every", "full"):
        from mlbench.errors import OptionsError

        raise OptionsError(f"stats must be True, False, 'every' or 'full', got {stats!r}; True records min/max "
                           "of block outputs and finds NaN/Inf, 'every' of every module's output, 'full' adds "
                           "the mean, False records shapes only.")
    if stats is not True or not eval:
        return _trace(model, x, "full" if stats == "full" else "every" if stats else False, eval)
    rng = _random_state(x)
    trace = _trace(model, x, "blocks", eval)
    if trace.error is None and trace._alarm:
        _restore_random_state(rng)
        trace = _trace(model, x, "every", eval)
        trace.passes = 2
    return trace


def _random_state(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The CPU generator's state, and that of ``x``'s CUDA device when it is on one."""
    cuda = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_random_state(state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


def _trace(model: nn.Module, x: torch.Tensor, scope: str | bool, eval: bool) -> ShapeTrace:
    """One traced forward; ``scope``: False, "blocks", "every" or "full" (every output, and the mean)."""
    values = None
    if scope:
        values = OutputValues(mean=scope == "full", scope="blocks" if scope == "blocks" else "every", root=model)
    recorder = _Recorder(values)
    output, error = None, None
    with module_calls(model, recorder.around, eval=eval), torch.no_grad():
        try:
            output = model(x)
        except Exception as exc:  # kept in the trace, explained by .explain()
            error = exc
    innermost = recorder.settle(error)
    operands = () if innermost is None else tuple(shape_text(s) for s in _plain_inputs(innermost[_INPUTS]))
    trace = ShapeTrace(model, x, recorder.calls, output, error, operands)
    trace.statistics = _SCOPES[scope] if not x.is_meta else "none"  # a meta tensor has shapes, no values
    if values is not None:
        trace.input_nonfinite = nonfinite(stats_of([x], mean=False))
        bad = [c[_MODULE] for c in recorder.calls if nonfinite(c[_STATS])]
        trace._alarm = bool(values.hidden or bad or trace.input_nonfinite)
        paths = module_paths(model) if values.hidden or (bad and values.every) else {}
        if values.hidden:
            trace.hidden_nonfinite = tuple(dict.fromkeys(paths.get(m, "?") for m in values.hidden))
        if bad and values.every:
            trace.nonfinite_parameters = {
                paths[m]: sum(int((~torch.isfinite(p)).sum()) for p in m.parameters()) for m in bad}
    return trace


_SCOPES = {False: "none", "blocks": "blocks", "every": "every module", "full": "every module, with the mean"}
