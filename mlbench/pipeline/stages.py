"""The five stages of "segment an image": decode, preprocess, forward, postprocess, polygons.

Each stage is a plain function of a :class:`StageContext` (the options, the model, the
source and the outputs of earlier stages) that returns a new value and changes nothing
it was given. :class:`mlbench.Pipeline` runs them in order and records each one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from mlbench.errors import ImageError, ModelError, OptionsError
from mlbench.image.read import ImageReport, effective_bit_depth, read_image, refuse_non_real, value_problems
from mlbench.findings import Problem, ReportText
from mlbench.image.formats import IMAGE_SOURCES, sniff_format
from mlbench.models.cards import ModelCard, card
from mlbench.pipeline.options import PipelineOptions
from mlbench.pipeline.polygons import mask_to_polygons
from mlbench.pipeline.postprocess import postprocess_output
from mlbench.pipeline.preprocess import normalize_tensor, preprocess_array
from mlbench.pipeline.recipe import normalize_unit
from mlbench.pipeline.train_mode import evaluating
from mlbench.models.materialised import check_materialised

__all__ = ["StageContext", "Decoded", "STAGES", "STAGE_NAMES", "default_input_size", "describe"]


@dataclass
class StageContext:
    """What a stage may read: options (resolved from the card), the model and its card, the original
    source and earlier outputs; ``notes`` collects what a stage wants the run to say (a conversion)."""

    options: PipelineOptions
    model: torch.nn.Module
    source: Any
    outputs: dict[str, Any] = field(default_factory=dict)
    card: ModelCard = field(default_factory=ModelCard)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True, repr=False)
class Decoded(ReportText):
    """The decoded image exactly as the next stage receives it, and its report."""

    image: np.ndarray
    report: ImageReport

    def text(self) -> str:
        lo, hi = self.report.value_range
        name = self.report.name if self.report.name.startswith("<") else Path(self.report.name).name
        return (f"Decoded({name}: shape={self.image.shape}, dtype={self.image.dtype}, "
                f"{self.report.bit_depth}-bit, values {lo:.4g}..{hi:.4g})")


def default_input_size(model: torch.nn.Module) -> int:
    """The square input side a model runs at unless options say otherwise: its card's.

    Bundled small models carry the size they were trained at; checkpoints and unknown models
    run at the service's 1024.
    """
    return card(model).input_size


def _array_report(image: np.ndarray, name: str, fmt: str, problems: tuple[Problem, ...] = ()) -> ImageReport:
    return ImageReport(
        name=name, format=fmt, dtype=str(image.dtype), shape=tuple(image.shape),
        bit_depth=effective_bit_depth(image), channels=1 if image.ndim == 2 else image.shape[2],
        value_range=(float(image.min()), float(image.max())) if image.size else (0.0, 0.0), problems=problems,
    )


def _pil_decode(ctx: StageContext) -> Decoded:
    """The service's decode: ``Image.open(upload)`` and, unless disabled, ``convert('RGB')``."""
    from PIL import Image

    from mlbench.image.formats import bytes_io, load_bytes

    if isinstance(ctx.source, np.ndarray):
        pil, name, fmt = Image.fromarray(ctx.source), "<array>", "array"
    else:
        data, name = load_bytes(ctx.source)
        pil, fmt = Image.open(bytes_io(data)), sniff_format(data[:16]) or "unknown"
    if ctx.options.convert_rgb:
        pil = pil.convert("RGB")
    image = np.array(pil)
    return Decoded(image, _array_report(image, name, fmt))


_PIL_TO_ARRAY = {"P": "RGBA", "PA": "RGBA", "CMYK": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}
"""PIL modes whose array is not the image's values (palette indices, ink, another colour space)."""


def image_source(image: Any) -> Any:
    """What a run decodes, from what users hand over: a path, bytes or an array as they are; an
    open binary file's bytes; a PIL image's pixels (palette and CMYK converted to colours); a
    tensor's values on the CPU.

    Raises
    ------
    OptionsError
        For anything else, naming what was given.
    """
    if isinstance(image, (*IMAGE_SOURCES, np.ndarray)):
        return image
    if hasattr(image, "read") and callable(image.read):
        data = image.read()
        if isinstance(data, (bytes, bytearray)):
            return bytes(data)
        raise OptionsError(f"image is a text file object ({type(image).__name__}); open the image with 'rb'")
    if isinstance(image, torch.Tensor):  # NumPy has no bfloat16
        values = image.detach().cpu()
        return (values.float() if values.dtype == torch.bfloat16 else values).numpy()
    from PIL import Image

    if isinstance(image, Image.Image):
        mode = _PIL_TO_ARRAY.get(image.mode)
        return np.array(image.convert(mode) if mode else image)
    raise OptionsError(f"image must be a path, bytes, an open binary file, a PIL image or an (H, W[, C]) array, got "
                       f"{type(image).__name__}")


def decode(ctx: StageContext) -> Decoded:
    """Source (path, bytes or array) -> :class:`Decoded`, by ``options.decoder``."""
    if ctx.options.decoder == "pil":
        return _pil_decode(ctx)
    if isinstance(ctx.source, np.ndarray):
        if ctx.source.size == 0:
            raise ImageError(f"<array>: the image array has no pixels (shape {ctx.source.shape}); pass the image itself")
        refuse_non_real(ctx.source, "<array>: the image array")
        image = np.array(ctx.source, copy=True)
        return Decoded(image, _array_report(image, "<array>", "array", tuple(value_problems(image))))
    image, report = read_image(ctx.source)
    return Decoded(image, report)


def _served_preprocess(image: np.ndarray, options: PipelineOptions, card: ModelCard) -> torch.Tensor:
    """The service's preprocessing: PIL Lanczos stretch of the 8-bit image, /255, to tensor."""
    from PIL import Image

    pil = Image.fromarray(image)
    if options.resize == "stretch":
        pil = pil.resize((options.input_size, options.input_size), Image.Resampling.LANCZOS)
    array = np.asarray(pil).astype(np.float32) / np.float32(255.0)
    tensor = torch.from_numpy(array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy())
    if options.normalize == "imagenet":  # torch's in-place broadcast: the service's grey-image crash text
        tensor = normalize_tensor(tensor, card.mean, card.std)
    elif options.normalize not in ("none", "x/255"):
        values = normalize_unit(tensor.permute(1, 2, 0).numpy(), card, None if options.normalize == "card" else options.normalize)
        tensor = torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))
    return tensor[None]


def _refuse_nonfinite(image: np.ndarray, name: str) -> None:
    """An ImageError for a float image holding NaN or infinity: through a norm one NaN pixel
    reaches every output pixel, and the mask would come back empty without an error."""
    if image.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(image)
    if not bad.any():
        return
    nan = int(np.isnan(image).sum())
    row, col = (int(i) for i in np.argwhere(bad)[0][:2])
    raise ImageError(f"{name}: {nan:,} NaN and {int(bad.sum()) - nan:,} infinite value(s) in the image (the first at "
                     f"row {row}, column {col}): a NaN spreads through every convolution, and through a norm to "
                     "every output pixel, so the mask comes back empty or wrong. Replace them first "
                     "(np.nan_to_num(image, nan=0.0, posinf=..., neginf=...), or the background value) or fix the "
                     "export that wrote them")


def preprocess(ctx: StageContext) -> torch.Tensor:
    """Decoded image -> (1, C, H', W') float32 model input, by the card's recipe and the options;
    the careful path refuses a float image holding NaN or infinity (:class:`ImageError`)."""
    decoded = ctx.outputs["decode"]
    if ctx.options.decoder == "pil":
        return _served_preprocess(decoded.image, ctx.options, ctx.card)
    _refuse_nonfinite(decoded.image, decoded.report.name)
    return preprocess_array(decoded.image, ctx.options, ctx.card, ctx.notes)


def forward(ctx: StageContext) -> torch.Tensor:
    """Model input -> raw output on the CPU, no gradients; a model in train mode runs in eval mode
    (its flags restored afterwards) unless ``train_mode="keep"``."""
    model = ctx.model
    device = torch.device(ctx.options.device)
    x = ctx.outputs["preprocess"].to(device)
    weight = check_materialised(model)
    if weight is not None and weight.dtype != x.dtype:
        x = x.to(weight.dtype)  # a float16 or bfloat16 checkpoint: the input follows the weights
        ctx.notes.append(f"input cast to {str(weight.dtype).replace('torch.', '')}, the dtype of the model's weights")
    with torch.inference_mode(), evaluating(model, ctx.options.train_mode != "keep"):
        output = model(x)
    if not isinstance(output, torch.Tensor):
        keys = f" with keys {list(output)[:6]}" if isinstance(output, dict) else ""
        raise ModelError(f"{type(model).__name__} returned a {type(output).__name__}{keys}, not one tensor; the "
                         "pipeline needs its (1, C, H, W) map: wrap the model in a module whose forward returns it "
                         "(model(x)['out'] for torchvision's segmentation models, model(x).logits for Hugging Face's)")
    return output.detach().cpu()


def postprocess(ctx: StageContext):
    """Raw output -> probability and mask at the decoded image's size."""
    height, width = ctx.outputs["decode"].image.shape[:2]
    return postprocess_output(ctx.outputs["forward"], (height, width), ctx.options, ctx.card)


def polygons(ctx: StageContext) -> list[dict[str, Any]]:
    """Mask -> the service's polygons; confidence is ``sigmoid(raw output).max()`` as served.

    The service took the sigmoid of the raw output for the confidence even when its
    post-processing had not (an output already inside [0, 1]); for logits both agree with the
    maximum probability at the model's resolution.
    """
    post, raw = ctx.outputs["postprocess"], ctx.outputs["forward"]
    one_channel = raw.dim() == 4 and raw.shape[1] == 1
    confidence = float(torch.sigmoid(raw.float()).max()) if one_channel else float(post.probability.max())
    return mask_to_polygons(
        post.mask, confidence=confidence if raw.numel() else 0.0,
        detect_holes=ctx.options.detect_holes, min_area=ctx.options.min_area, hierarchy=ctx.options.hierarchy,
    )


STAGES: tuple[tuple[str, Callable[[StageContext], Any]], ...] = (
    ("decode", decode), ("preprocess", preprocess), ("forward", forward),
    ("postprocess", postprocess), ("polygons", polygons),
)
STAGE_NAMES = tuple(name for name, _ in STAGES)


def describe(value: Any) -> str:
    """A one-line summary of a stage's input or output (shape, dtype, range)."""
    if isinstance(value, torch.Tensor):
        if value.numel() and value.is_floating_point():
            return f"tensor{tuple(value.shape)} {value.dtype} range {float(value.min()):.4g}..{float(value.max()):.4g}"
        return f"tensor{tuple(value.shape)} {value.dtype}"
    if isinstance(value, np.ndarray):
        numeric = value.size and value.dtype.kind in "biuf"  # no range for complex or object arrays
        rng = f" range {float(value.min()):.4g}..{float(value.max()):.4g}" if numeric else ""
        return f"array{value.shape} {value.dtype}{rng}"
    if isinstance(value, list):
        return f"{len(value)} polygon(s)"
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    return repr(value) if len(repr(value)) < 200 else type(value).__name__
