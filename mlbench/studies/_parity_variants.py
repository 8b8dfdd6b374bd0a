"""The ways of running one model that :func:`mlbench.parity` compares, each planned from the reference.

A plan is what the variant runs: the module (the reference itself, or a copy cast, moved or put in
train mode, so the caller's model is never changed), its input, the context around the forward
(autocast, a thread count, a seeded random state), and the compute dtype that picks the tolerance.
An exported graph (TorchScript, ONNX) is planned as a function of the input instead: it has no
modules to trace. A variant that cannot run here raises :class:`Unavailable` with the reason.
"""

from __future__ import annotations

import copy
import difflib
import io
import logging
import re
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mlbench.checks.environment_probes import no_cuda_reason
from mlbench.errors import ModelError, OptionsError
from mlbench.pipeline.train_mode import evaluating, train_sensitive_modules
from mlbench.probes.accounting import tensors_in

__all__ = ["VARIANTS", "Plan", "Unavailable", "parse_variants", "plan_variant", "main_output"]

VARIANTS = ("bf16", "fp16", "autocast", "train_mode", "batch4", "channels_last", "threads1", "repeat",
            "torchscript", "onnx", "cuda", "cpu")
"""Every variant :func:`mlbench.parity` knows; ``batch<N>`` and ``threads<N>`` take any N >= 1."""

_NUMBERED = re.compile(r"^(batch|threads)(\d+)$")
_ONNX_PACKAGES = ("onnxruntime", "onnxscript", "onnx")


class Unavailable(Exception):
    """A variant that cannot run here; the message says why and what would make it run."""


@dataclass
class Plan:
    """What one variant runs: ``model(x)`` traced module by module, or ``run(x)`` for an exported graph."""

    dtype: torch.dtype
    x: torch.Tensor
    model: nn.Module | None = None
    context: Callable[[], AbstractContextManager] = nullcontext
    eval: bool = True
    run: Callable[[torch.Tensor], torch.Tensor] | None = None
    note: str = ""


def main_output(model: Any, output: Any) -> torch.Tensor:
    """The raw output map: the tensor itself, or the first (N, C, H, W) tensor inside a tuple or dict.

    Raises
    ------
    ModelError
        When the output holds no (N, C, H, W) tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    found = next((t for t in tensors_in(output) if t.dim() == 4), None)
    if found is None:
        raise ModelError(f"{type(model).__name__} returned {type(output).__name__} without an (N, C, H, W) tensor; "
                         "parity compares models that return their raw output map, as the pipeline's forward stage does")
    return found


def parse_variants(variants: Any) -> list[str]:
    """The variant names asked for (default all of :data:`VARIANTS`), each once, in order.

    Raises
    ------
    OptionsError
        For an unknown name (with the closest known one), or an empty list.
    """
    if variants is None:
        return list(VARIANTS)
    names: list[str] = []
    for name in [variants] if isinstance(variants, str) else list(variants):
        numbered = _NUMBERED.match(name) if isinstance(name, str) else None
        if not (name in VARIANTS or (numbered and int(numbered.group(2)) >= 1)):
            close = difflib.get_close_matches(str(name), VARIANTS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise OptionsError(f"unknown parity variant {name!r}{hint}; expected some of {list(VARIANTS)}, "
                               "batch<N> and threads<N> with any N >= 1")
        if name not in names:
            names.append(name)
    if not names:
        raise OptionsError(f"variants is empty; pass some of {list(VARIANTS)}, or None for all of them")
    return names


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy to cast, move or train: the caller's model is never changed."""
    return copy.deepcopy(model)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seeded(seed: int, device: torch.device) -> Callable[[], AbstractContextManager]:
    @contextmanager
    def context() -> Iterator[None]:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            yield
    return context


@contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Log records of logger ``name`` below ERROR dropped for the block (torch.onnx logs that torchvision's
    operators are skipped when torchvision is not installed: true, and nothing to do with the model)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _warned(caught: list[warnings.WarningMessage]) -> str:
    """What the export warned, by category, with the first message of each."""
    counts = Counter(w.category.__name__ for w in caught)
    first: dict[str, str] = {}
    for w in caught:
        first.setdefault(w.category.__name__, str(w.message).splitlines()[0][:110])
    return "; ".join(f"{n} {kind} (first: {first[kind]!r})" for kind, n in counts.most_common())


class Float16ConvolutionsOnCpu(TorchFunctionMode):
    """Convolutions of float16 tensors on the CPU computed in float32 on the float16 values, the
    result rounded to float16: float32 accumulation, as a GPU's float16 convolution does.

    Why: the CPU's own float16 convolution is a slow path (a forward of a 256 px small model takes
    14 to 60 times longer, ``bench/parity.py --fp16-kernels``), and it accumulates in float32 too:
    its outputs equal these on 99.7-99.9% of elements, the others are one float16 step apart
    (summation order), and both are as far from a float64 convolution. A transposed convolution's
    bias is added after the rounding, in float16, as that kernel does. Every other op still runs
    in float16, so an overflow in a float16 sum (MA-ResUNet's SimAM) still shows.
    """

    TRANSPOSED = frozenset({torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d})
    OPS = TRANSPOSED | {torch.conv1d, torch.conv2d, torch.conv3d}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else kwargs.get("input")
        if (func not in self.OPS or not isinstance(first, torch.Tensor) or first.dtype != torch.float16
                or first.device.type != "cpu"):
            return func(*args, **kwargs)

        def widened(value: Any) -> Any:
            is_half = isinstance(value, torch.Tensor) and value.dtype == torch.float16
            return value.float() if is_half else value
        args, kwargs, bias = list(args), dict(kwargs), None
        if func in self.TRANSPOSED:  # the CPU kernel adds the bias to the rounded result, in float16
            if len(args) > 2:
                bias, args[2] = args[2], None
            else:
                bias = kwargs.pop("bias", None)
        out = func(*map(widened, args), **{k: widened(v) for k, v in kwargs.items()}).half()
        return out if bias is None else out + bias.view(-1, *[1] * (out.dim() - 2))


def _cast(model: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> Plan:
    note, context = f"weights and input cast to {dtype}", nullcontext
    if dtype == torch.float16 and x.device.type == "cpu":
        note += ("; on the CPU convolutions accumulate in float32 (as on a GPU; the CPU's float16 kernel is "
                 "14-60x slower)")
        context = Float16ConvolutionsOnCpu
    return Plan(dtype, x.to(dtype), _copy(model).to(dtype), context, note=note)


def _autocast(model: nn.Module, x: torch.Tensor) -> Plan:
    kind = x.device.type
    dtype = torch.bfloat16 if kind == "cpu" else torch.float16
    return Plan(dtype, x, model, lambda: torch.autocast(kind, dtype=dtype), note=f"torch.autocast({kind!r}, {dtype})")


def _train_mode(model: nn.Module, x: torch.Tensor, seed: int) -> Plan:
    trained = _copy(model).train()  # a copy: BatchNorm in train mode updates its running statistics
    changed = train_sensitive_modules(trained)
    listed = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
    note = (f"{len(changed)} module(s) compute differently in train mode ({listed}); random state seeded {seed}"
            if changed else "no module computes differently in train mode (no BatchNorm, no Dropout with p > 0)")
    return Plan(torch.float32, x, trained, _seeded(seed, x.device), eval=False, note=note)


def _channels_last(model: nn.Module, x: torch.Tensor) -> Plan:
    if x.dim() != 4:
        raise Unavailable(f"channels_last needs an (N, C, H, W) input, got shape {tuple(x.shape)}")
    moved = _copy(model).to(memory_format=torch.channels_last)
    return Plan(torch.float32, x.contiguous(memory_format=torch.channels_last), moved)


def _torchscript(model: nn.Module, x: torch.Tensor) -> Plan:
    with evaluating(model), torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x, check_trace=False)

    def run(value: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return main_output(model, traced(value))

    said = _warned(caught)
    return Plan(torch.float32, x, run=run, note="outputs only: no module trace inside a TorchScript graph; "
                "torch.jit.trace froze the Python control flow for this input size" + (f"; it warned {said}" if said else ""))


def _onnx(model: nn.Module, x: torch.Tensor) -> Plan:
    missing = [name for name in _ONNX_PACKAGES if find_spec(name) is None]
    if missing:
        raise Unavailable(f"{', '.join(missing)} not installed here (torch.onnx.export needs onnx and onnxscript, "
                          "running the graph needs onnxruntime): pip install 'mlbench[parity]'")
    import onnxruntime

    with (evaluating(model), warnings.catch_warnings(record=True) as caught,
          redirect_stdout(io.StringIO()), _quiet("torch.onnx")):  # its progress lines and log records: dropped
        warnings.simplefilter("always")  # its warnings: the row's note
        program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(value: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: value.detach().cpu().numpy()})[0])

    said = _warned(caught)
    return Plan(torch.float32, x, run=run, note=f"outputs only: no module trace inside an ONNX graph; exported by "
                f"torch.onnx.export(dynamo=True), run by onnxruntime {onnxruntime.__version__} on the CPU"
                + (f"; the export warned {said}" if said else ""))


def _device(model: nn.Module, x: torch.Tensor, kind: str) -> Plan:
    """A copy of the model and the input on ``kind`` ("cuda" or "cpu"), the other device than the reference's."""
    if x.device.type == kind:
        raise Unavailable(f"the reference already runs on {kind}; pass device='{'cpu' if kind == 'cuda' else 'cuda'}' "
                          f"(a pipeline option) to run the reference there and compare it with {kind}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise Unavailable(no_cuda_reason() or "no CUDA device")
    note = ""
    if kind == "cuda":
        note = (f"TF32 allowed: matmul {torch.backends.cuda.matmul.allow_tf32}, cudnn {torch.backends.cudnn.allow_tf32} "
                "(TF32 convolutions round to 10 bits: expect float32 departures)")
    return Plan(torch.float32, x.to(kind), _copy(model).to(kind), note=note)


def plan_variant(name: str, model: nn.Module, x: torch.Tensor, seed: int = 0) -> Plan:
    """The plan of variant ``name`` for ``model`` (eval, float32) on input ``x`` (batch 1).

    Raises
    ------
    Unavailable
        When the variant cannot run here (no CUDA, onnxruntime missing, ...), with the reason.
    """
    numbered = _NUMBERED.match(name)
    if numbered and numbered.group(1) == "batch":
        count = int(numbered.group(2))
        return Plan(torch.float32, x.repeat(count, *([1] * (x.dim() - 1))), model,
                    note=f"{count} copies of the input; every item is compared with the reference")
    if numbered:
        count = int(numbered.group(2))
        same = torch.get_num_threads() == count
        return Plan(torch.float32, x, model, lambda: _threads(count),
                    note=f"the reference ran with {count} thread(s) too: this is a repeat" if same else "")
    planners: dict[str, Callable[[], Plan]] = {
        "bf16": lambda: _cast(model, x, torch.bfloat16), "fp16": lambda: _cast(model, x, torch.float16),
        "autocast": lambda: _autocast(model, x), "train_mode": lambda: _train_mode(model, x, seed),
        "channels_last": lambda: _channels_last(model, x), "torchscript": lambda: _torchscript(model, x),
        "onnx": lambda: _onnx(model, x), "cuda": lambda: _device(model, x, "cuda"),
        "cpu": lambda: _device(model, x, "cpu"),
        "repeat": lambda: Plan(torch.float32, x, model, note="the reference forward again: any difference is "
                               "nondeterminism"),
    }
    return planners[name]()
