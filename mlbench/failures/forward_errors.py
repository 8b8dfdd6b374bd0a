"""Explanations of forward-pass failures and silent surprises, each with its fix.

:func:`explain_error` turns an exception (plus what is known: model, input shape and dtype,
the module that failed and its operands) into an :class:`Explanation`: the failure class,
the evidence, why it happened in terms of the input, and the fix. :func:`valid_sides` gives
the nearest input sides a model accepts, e.g. 992 and 1008 for MA-ResUNet at 1000.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mlbench.findings import ReportText
from mlbench.models.cards import card

__all__ = ["Explanation", "explain_error", "valid_sides", "size_chain", "explain_output_size"]

_SIZE = re.compile(r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\) at non-singleton dimension (\d+)")
_CAT = re.compile(r"Sizes of tensors must match except in dimension (\d+)\. Expected size (\d+) but got size (\d+)")
_META = re.compile(r"broadcast a dimension of length (\d+).*?broadcastable to \[([\d, ]+)\]", re.DOTALL)
_CHANNELS = re.compile(r"expected input\[([\d, ]+)\] to have (\d+) channels, but got (\d+) channels")
_BROADCAST = re.compile(r"output with shape \[([\d, ]+)\] doesn't match the broadcast shape \[([\d, ]+)\]")
_DTYPE = re.compile(r"expected scalar type (\w+) but found (\w+)|Input type \((.+?)\) and (?:weight|bias) type \((.+?)\)"
                    r"|should be the same|must have the same dtype|not implemented for '(\w+)'")
_OOM = re.compile(r"out of memory|can't allocate memory|OutOfMemory", re.IGNORECASE)


@dataclass(frozen=True, repr=False)
class Explanation(ReportText):
    """Why a forward pass failed (or misbehaved) and how to fix it; the repr is the report."""

    failure_class: str
    summary: str
    evidence: tuple[str, ...] = ()
    cause: str = ""
    fix: str = ""
    module: str = ""
    valid_sizes: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def hints(self) -> str:
        """``"; cause: ...; fix: ..."`` (the parts known), to follow another error's message."""
        return "".join(f"; {label}: {text}" for label, text in (("cause", self.cause), ("fix", self.fix)) if text)

    def text(self) -> str:
        lines = [f"{self.failure_class}: {self.summary}"]
        lines += [f"  evidence: {item}" for item in self.evidence]
        lines += [f"  cause:    {self.cause}"] if self.cause else []
        lines += [f"  fix:      {self.fix}"] if self.fix else []
        return "\n".join(lines)


def valid_sides(side: int, multiple: int, minimum: int = 1) -> tuple[int, ...]:
    """The nearest multiples of ``multiple`` around ``side`` (at least ``minimum``), ascending.

    >>> valid_sides(1000, 16)
    (992, 1008)
    """
    below = (side // multiple) * multiple
    above = below if below == side else below + multiple
    return tuple(sorted({s for s in (below, above) if s >= max(minimum, 1)}))


def size_chain(side: int, multiple: int) -> list[int]:
    """The side at each 2x down-sampling level down to 1/``multiple``: 1000 -> [1000, 500, 250, 125, 62]."""
    chain = [side]
    for _ in range(int(round(math.log2(multiple))) if multiple > 1 else 0):
        chain.append(chain[-1] // 2)
    return chain


def _model_facts(model: Any) -> tuple[str, int, int]:
    """Name, input multiple and minimum side, from the model's card (a stand-in object's attributes)."""
    if isinstance(model, torch.nn.Module):
        about = card(model)
        return about.name, about.input_multiple, about.min_input_size
    name = getattr(model, "name", "") or "the model"
    return name, int(getattr(model, "input_multiple", 1)), int(getattr(model, "min_input_size", 1))


def _size_cause(input_shape: tuple[int, ...] | None, multiple: int, name: str) -> tuple[str, tuple[int, ...], str]:
    """Relate a size mismatch to the input size: the odd level, valid sides, pad/crop fix."""
    if not input_shape or multiple <= 1:
        return ("two feature maps that must align differ in size; the input side is probably not a "
                "multiple of the model's total down-sampling"), (), "resize or pad the input to a multiple of the model's stride"
    causes, sides = [], []
    height, width = input_shape[-2:]
    axes = {"H and W": height} if height == width else {"H": height, "W": width}
    for axis, side in axes.items():
        if side % multiple == 0:
            continue
        chain = size_chain(side, multiple)
        odd = next((i for i, s in enumerate(chain[:-1]) if s % 2), 0)
        causes.append(
            f"{axis} = {side} is not a multiple of {multiple}: {name} halves it {len(chain) - 1} times "
            f"({' -> '.join(map(str, chain))}); at 1/{2**odd} the side {chain[odd]} is odd, pooling floors it "
            f"to {chain[odd + 1]}, and up-sampling back gives {2 * chain[odd + 1]} != {chain[odd]}")
        sides.extend(valid_sides(side, multiple))
    if not causes:
        return "the input side is a multiple of the stride; the mismatch comes from elsewhere", (), ""
    valid = tuple(sorted(set(sides)))
    pad = "x, crop = mb.pad_to_multiple(x, %d)  # reflect-pad, run, then crop the output back" % multiple
    fix = f"use a side that is a multiple of {multiple}: {' or '.join(map(str, valid))} work; {pad}"
    return "; ".join(causes), valid, fix


def explain_error(
    exc: BaseException,
    *,
    model: Any = None,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: Any = None,
    module: str = "",
    operands: tuple[str, ...] = (),
) -> Explanation:
    """Explain ``exc`` raised by a forward pass (or by pre-processing).

    Parameters
    ----------
    exc : BaseException
        The exception.
    model : nn.Module, optional
        Its card supplies the name, ``input_multiple`` and ``min_input_size``.
    input_shape : tuple of int, optional
        Shape of the model input (N, C, H, W).
    input_dtype : torch.dtype, optional
        Dtype of the model input.
    module : str
        The module that failed (path and type), as a trace's pre-hook recorded it.
    operands : tuple of str
        Shapes of that module's inputs.
    """
    text = str(exc)
    name, multiple, minimum = _model_facts(model)
    where = f" in {module}" if module else ""
    evidence = tuple(e for e in (f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}",
                                 f"operands of the failing module: {', '.join(operands)}" if operands else "",
                                 f"input {tuple(input_shape)}" + (f" {input_dtype}" if input_dtype else "") if input_shape else "") if e)
    for rule in (_explain_size, _explain_channels, _explain_broadcast, _explain_dtype, _explain_batch, _explain_small, _explain_device,
                 _explain_oom):
        found = rule(text, exc, name, multiple, minimum, input_shape, input_dtype)
        if found is not None:
            failure_class, summary, cause, fix, valid = found
            return Explanation(failure_class, summary + where, evidence, cause, fix, module, valid)
    return Explanation("unknown", f"{type(exc).__name__}{where}", evidence, "not a known forward-pass failure",
                       "read the traceback; mb.trace_shapes(model, x).table shows every module's shapes", module)


def _explain_size(text, exc, name, multiple, minimum, shape, dtype):
    if _SIZE.search(text):
        a, b = _SIZE.search(text).groups()[:2]
    elif _CAT.search(text):
        a, b = _CAT.search(text).groups()[1:]
    elif _META.search(text):  # the same mismatch on the meta device
        length, target = _META.search(text).groups()
        a, b = target.split(",")[-1].strip(), length
    else:
        return None
    cause, valid, fix = _size_cause(shape, multiple, name)
    return "shape_mismatch", f"feature maps of size {a} and {b} cannot be combined", cause, fix, valid


def _explain_channels(text, exc, name, multiple, minimum, shape, dtype):
    match = _CHANNELS.search(text)
    if not match:
        return None
    want, got = int(match.group(2)), int(match.group(3))
    fixes = {1: "the image is grayscale: repeat it to 3 channels (x.expand(-1, 3, -1, -1), "
                "np.repeat(image[..., None], 3, axis=2) or PIL .convert('RGB'))",
             4: "the image has an alpha channel: drop it (x[:, :3] or PIL .convert('RGB'))"}
    fix = fixes.get(got, f"convert the image to {want} channels before the model")
    return ("shape_mismatch", f"the model expects {want} input channels but got {got}",
            f"the first convolution has weights for {want} channels", fix, ())


def _explain_broadcast(text, exc, name, multiple, minimum, shape, dtype):
    match = _BROADCAST.search(text)
    if not match:
        return None
    have, want = match.group(1), match.group(2)
    return ("shape_mismatch", f"an in-place operation on a [{have}] tensor needs [{want}]",
            "a 1-channel (grayscale) image met a 3-channel mean/std: in-place normalisation cannot grow the "
            "channel axis (the service's refactor dropped convert('RGB'))",
            "make the image 3-channel before normalising: PIL .convert('RGB'), or a card with channels=1 for a grey model", ())


_WEIGHT_TYPE = re.compile(r"(?:bias|weight) type \(([\w:.]+)\)")


def _explain_dtype(text, exc, name, multiple, minimum, shape, dtype):
    match = _DTYPE.search(text)
    if not match:
        return None
    found = match.group(1) or match.group(3) or match.group(5) or (str(dtype) if dtype is not None else "another dtype")
    scale = " and divide by 255 (or the bit depth's maximum)" if "Byte" in found or "uint8" in str(dtype) else ""
    weights = _WEIGHT_TYPE.search(text)
    if weights and re.search(r"Half|BFloat16|Double", weights.group(1)):  # a float16/bfloat16/float64 model
        kind = weights.group(1).rpartition(":")[2].rpartition(".")[2]
        return ("dtype_mismatch", f"the input is {found} but the model's weights are {kind}",
                "convolutions need the input and the weights in the same dtype",
                "cast the input to the weights' dtype (x = x.to(next(model.parameters()).dtype)), or run the model "
                "in float32 (model.float()); mb.segment does the first itself", ())
    return ("dtype_mismatch", f"the input is {found} but the model's weights are float32",
            "convolutions need the input and the weights in the same dtype",
            f"convert the input: x = x.float(){scale}; or model.to(x.dtype) for a deliberate choice", ())


def _explain_batch(text, exc, name, multiple, minimum, shape, dtype):
    if "Dimension out of range" not in text or not shape or len(shape) != 3:
        return None
    return ("shape_mismatch", f"the input {tuple(shape)} has no batch axis",
            "the model expects (N, C, H, W)", "add the batch axis: x = x[None] (or x.unsqueeze(0))", ())


def _explain_small(text, exc, name, multiple, minimum, shape, dtype):
    if "Expected more than 1 spatial element" not in text:
        return None
    side = multiple * math.ceil(max(minimum, multiple) / multiple)
    grid = f" (a multiple of {multiple})" if multiple > 1 else ""
    return ("shape_mismatch", "the input is too small for the model's depth",
            "the deepest level became 1x1 and InstanceNorm needs more than one element",
            f"use a side of at least {side}{grid}, or pad the image up to it", (side,))


def _explain_device(text, exc, name, multiple, minimum, shape, dtype):
    if "expected device" not in text and "same device" not in text:
        return None
    return ("device_mismatch", "the input and the model's weights are on different devices",
            "every tensor of one op must live on one device", "move the input: x = x.to(next(model.parameters()).device)", ())


def _explain_oom(text, exc, name, multiple, minimum, shape, dtype):
    if not (_OOM.search(text) or isinstance(exc, MemoryError)):
        return None
    return ("cuda_oom", "the forward pass ran out of memory",
            "activations (for ma_resunet its bottleneck attention, quadratic in pixels) exceed the device",
            "check mb.estimate_memory(model, shape); use mb.max_input_size(model, budget) or mb.predict_tiled", ())


def explain_output_size(model: Any, input_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> Explanation | None:
    """An :class:`Explanation` when the output's H, W differ from the input's (HRNet: 250 -> 252)."""
    if len(input_shape) != 4 or len(output_shape) != 4 or tuple(input_shape[-2:]) == tuple(output_shape[-2:]):
        return None
    name, multiple, minimum = _model_facts(model)
    (h, w), (oh, ow) = input_shape[-2:], output_shape[-2:]
    valid = tuple(sorted(set(valid_sides(h, multiple, minimum) + valid_sides(w, multiple, minimum))))
    return Explanation(
        "shape_mismatch", f"output {oh}x{ow} differs from input {h}x{w}, silently",
        (f"input {tuple(input_shape)}", f"output {tuple(output_shape)}"),
        f"{name} works on a grid of {multiple} px and rounds the side up; the mask no longer lines up with the image",
        f"use a multiple of {multiple} ({' or '.join(map(str, valid))}), or resize/crop the output back to {h}x{w}",
        "(model)", valid)
