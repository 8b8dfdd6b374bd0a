"""One careful image loader with a declared policy.

The common readers fail silently in different ways (cv2 returns None or grey rows,
PIL opens 16-bit RGB as 8-bit, tifffile has no size limit). :func:`read_image` sniffs
the format from the bytes, checks the pixel count from the header before decoding,
keeps the container dtype (16-bit, 12-bit-in-16 and float stay as they are), applies
EXIF orientation, drops alpha, and raises :class:`ImageError` naming the file, what is
wrong and what to do. Every decision it takes is written into the :class:`ImageReport`.

What it costs beyond the decoder (``bench/read_image.py`` measures it per format): TIFF and BMP
files are decoded straight from the open file, never copied whole into memory first; the value
range, bit depth and NaN/Inf count are exact, from one pass over integer pixels (OpenCV's
``minMaxLoc``) or over float ones (torch's ``aminmax``, or numpy's min and max where torch is not
imported; a NaN shows in both extremes, so only then are they counted); the percentiles come from every value up to :data:`EXACT_PERCENTILES` values,
else from a strided grid of at least :data:`PERCENTILE_SAMPLE` (the report says so), with one
``np.partition``; a PNG's rows are inflated once more to hold them against its header (ISA-L when
installed), in a second thread while the decoder runs (both release the GIL), and a colour
JPEG's luma is decoded again only when its last pixel could be libjpeg's grey fill.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import numpy as np

from mlbench.budgets import Budgets, open_regular
from mlbench.budgets import budgets as budgets_in_force
from mlbench.errors import ImageError, OptionsError
from mlbench.findings import Problem, ReportText
from mlbench.image.decoders import decode
from mlbench.image.formats import EXTENSIONS, IMAGE_SOURCES, STREAMED, ImageSource, load_bytes, sniff_format
from mlbench.image.other_formats import HEAD_BYTES, identify, identify_by_name
from mlbench.isolation import call_isolated, isolate_default

__all__ = ["read_image", "ImageReport", "DEFAULT_MAX_PIXELS", "effective_bit_depth", "value_range", "percentiles",
           "EXACT_PERCENTILES", "PERCENTILE_SAMPLE", "value_problems", "refuse_non_real"]

DEFAULT_MAX_PIXELS = Budgets().max_pixels
PERCENTILES = (1.0, 50.0, 99.0)
PERCENTILES_NAMES = ("p1", "p50", "p99")


@dataclass(frozen=True, repr=False)
class ImageReport(ReportText):
    """What :func:`read_image` found and decided. The text repr is the report; a notebook shows a table.

    ``dtype`` is the container's, ``bit_depth`` the bits actually used (12 for 12-bit camera data
    in a 16-bit container); ``pages``/``page_used`` count planes of a stack (channels excluded);
    ``axes`` and ``compression`` come from TIFF headers; ``percentiles`` are p1, p50, p99 of every
    finite value, or of ``percentile_sample`` values (a strided grid) for an image of more than
    :data:`EXACT_PERCENTILES` values; ``value_range``, ``bit_depth`` and the NaN/Inf count are always
    exact. ``served`` holds what the ``as_served`` decode would do (filled by :func:`mlbench.check_image`).
    """

    name: str
    format: str
    dtype: str
    shape: tuple[int, ...]
    bit_depth: int
    channels: int
    pages: int = 1
    page_used: int = 0
    mode: str = ""
    orientation: int = 1
    value_range: tuple[float, float] = (0.0, 0.0)
    problems: tuple[Problem, ...] = field(default_factory=tuple)
    axes: str = ""
    compression: str = ""
    percentiles: tuple[float, ...] = ()
    alpha: bool = False
    served: tuple[str, ...] = ()
    percentile_sample: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing was found that changes what a model sees."""
        return not self.problems

    def to_dict(self) -> dict:
        """A JSON-ready dict (problems as ``{code, message}``)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "problems"}
        out["shape"] = list(self.shape)
        out["value_range"] = [round(v, 4) for v in self.value_range]
        out["percentiles"] = dict(zip(PERCENTILES_NAMES, (round(v, 4) for v in self.percentiles)))
        out["served"] = list(self.served)
        out["ok"] = self.ok
        out["problems"] = [{"code": p.code, "message": p.message} for p in self.problems]
        return out

    def text(self) -> str:
        """The report: format, dtype, bit depth, shape, values, what ``as_served`` does, the problems."""
        lo, hi = self.value_range
        if not self.shape:
            return "\n".join([f"ImageReport({self.name})", f"  format {self.format}, not decoded"]
                             + self._problem_lines(self.problems))
        lines = [
            f"ImageReport({self.name})",
            f"  format {self.format}, dtype {self.dtype}, {self.bit_depth}-bit effective, shape {self.shape}",
            f"  channels {self.channels}, page {self.page_used + 1} of {self.pages}, values {lo:.4g}..{hi:.4g}",
        ]
        extra = [f"axes {self.axes}" if self.axes else "", f"compression {self.compression}" if self.compression else "",
                 f"orientation {self.orientation}" if self.orientation != 1 else "", "alpha dropped" if self.alpha else ""]
        if self.percentiles:
            extra.append("percentiles " + ", ".join(f"{n} {v:.4g}" for n, v in zip(PERCENTILES_NAMES, self.percentiles))
                         + (f" (of {self.percentile_sample:,} sampled values)" if self.percentile_sample else ""))
        if any(extra):
            lines.append("  " + ", ".join(e for e in extra if e))
        lines += [f"  as_served: {note}" for note in self.served]
        return "\n".join(lines + self._problem_lines(self.problems))

    def _repr_html_(self) -> str:
        lo, hi = self.value_range
        facts = [("format", self.format), ("dtype", self.dtype), ("bit depth", self.bit_depth),
                 ("shape", self.shape), ("channels", self.channels), ("page", f"{self.page_used + 1} of {self.pages}"),
                 ("values", f"{lo:.4g}..{hi:.4g}")] if self.shape else [("format", f"{self.format}, not decoded")]
        facts += [(name, value) for name, value in (("axes", self.axes), ("compression", self.compression)) if value]
        facts += [(n, f"{v:.4g}") for n, v in zip(PERCENTILES_NAMES, self.percentiles)]
        facts += [("percentiles of", f"{self.percentile_sample:,} sampled values")] if self.percentile_sample else []
        facts += [("as_served", note) for note in self.served]
        return self._html(f"ImageReport({self.name})", (("fact", "value"), facts),
                          self._problem_table(self.problems))


def effective_bit_depth(array: np.ndarray, top: float | None = None) -> int:
    """Bits actually used: 8 for uint8, 12 for 16-bit data whose maximum is <= 4095, 32 for floats.
    ``top``, the array's maximum when already known, saves a pass over the pixels."""
    if array.dtype == np.bool_:
        return 1
    if np.issubdtype(array.dtype, np.floating):
        return array.dtype.itemsize * 8  # 16, 32 or 64
    top = (int(array.max()) if array.size else 0) if top is None else int(top)
    container = array.dtype.itemsize * 8
    return min(container, max(8, int(np.ceil(np.log2(top + 1))) if top > 0 else 8))


def read_image(source: ImageSource, *, page: int = 0, max_pixels: int | None = None,
               budgets: Budgets | None = None, isolate: bool | None = None) -> tuple[np.ndarray, ImageReport]:
    """Decode an image file or its bytes, keeping its data as it is.

    Parameters
    ----------
    source : path or bytes
        The image file, or its raw bytes (as uploaded to the service). A path must be a regular
        file: FIFOs, devices and sockets are refused before they are opened.
    page : int
        Which page of a multi-page TIFF to use (default the first).
    max_pixels : int, optional
        Refuse images with more pixels than this, checked from the header before decoding
        (default: the ``max_pixels`` budget, 64,000,000).
    budgets : Budgets, optional
        Bytes read, pixels, decoded bytes (pixels x channels x bytes per sample, from the header)
        and seconds; default :func:`mlbench.budgets.budgets` (``MLBENCH_MAX_*`` variables apply).
    isolate : bool, optional
        Decode in a child process (:mod:`mlbench.isolation`) with the ``max_decoder_memory`` and
        ``max_seconds`` budgets as its limits, so that a decoder crash or runaway allocation on a
        crafted file is an ImageError here, not a dead kernel; costs the array's copy through a
        pipe and about 1 ms a call (0.15 s for the first). Default: ``MLBENCH_ISOLATE_DECODERS``,
        else in this process. :func:`mlbench.check_image` isolates by default.

    Returns
    -------
    image : (H, W) or (H, W, 3) array
        Container dtype kept (uint8, uint16, float32 ...); alpha dropped; orientation applied (EXIF,
        or a TIFF's Orientation tag); samples as PIL, the service's reader, takes them where they
        are not plain grey or RGB (a MinIsWhite TIFF inverted, CMYK converted to RGB; a palette's
        indices kept): each of these is a problem in the report.
    report : ImageReport
        Format, dtype, effective bit depth, pages and every problem found.

    Raises
    ------
    ImageError
        For every file that cannot be read as it is (and only ImageError): missing, not a regular
        file, empty, not an image, over a budget, a header its data does not match, damaged.
    OptionsError
        When ``source`` is neither a path nor bytes (an array, None ...), or ``page`` is not a whole number.

    Examples
    --------
    12-bit camera data in a 16-bit TIFF keeps its dtype, and the report says how many bits it uses:

    >>> import mlbench as mb
    >>> image, report = read_image(mb.load_sample("spheroids_12bit").path)
    >>> image.dtype, image.shape, report.bit_depth
    (dtype('uint16'), (512, 512), 12)
    >>> read_image(b"<!DOCTYPE html><html>")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mlbench.errors.ImageError: <bytes>: not a recognised image (...); it looks like text or HTML (an error page saved as an image?); ...
    """
    if not isinstance(source, IMAGE_SOURCES):
        already = " (an array is decoded already: pass it to mb.segment or Pipeline.start as it is)" if isinstance(
            source, np.ndarray) else ""
        raise OptionsError(f"read_image(source=...) takes a path or the file's bytes, got {type(source).__name__}"
                           f"{already}")
    if isinstance(page, bool) or not isinstance(page, (int, np.integer)):
        raise OptionsError(f"read_image(page=...) takes a whole number of pages from 0, got {page!r} "
                           f"({type(page).__name__}); e.g. page=0 for the first")
    limits = budgets_in_force(budgets, **({} if max_pixels is None else {"max_pixels": max_pixels}))
    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    if isolate_default() if isolate is None else isolate:
        sent = bytes(source) if isinstance(source, (bytearray, memoryview)) else source
        return call_isolated("mlbench.image.read:read_image", (sent,), {"page": page, "budgets": limits, "isolate": False},
                             memory_bytes=limits.max_decoder_memory, seconds=limits.max_seconds, error=ImageError,
                             what=f"{name}: decoding the image")
    try:
        image, fmt, info = _decode(source, name, page, limits)
        return _report(image, fmt, name, info)
    except ImageError:
        raise
    except Exception as exc:  # a decoder's own error on a file it could not handle (IndexError, MemoryError ...)
        raise ImageError(f"{name}: the image cannot be decoded ({type(exc).__name__}: {str(exc)[:200]}); the file is "
                         "damaged or uses a feature not supported here: export it again (8- or 16-bit PNG or TIFF)"
                         ) from exc


def _decode(source: ImageSource, name: str, page: int, limits: Budgets) -> tuple[np.ndarray, str, dict]:
    """Sniff, check and decode: a TIFF or BMP file straight from the open file (:data:`STREAMED`),
    anything else from its bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, _ = load_bytes(source, limits.max_file_bytes)
        fmt = _sniff(data[:HEAD_BYTES], name)
        return _checked(decode(data, fmt, name, page, limits), fmt, name)
    with open_regular(source, ImageError, limits.max_file_bytes) as handle:
        fmt = _sniff(handle.read(HEAD_BYTES), name)
        if fmt in STREAMED:
            handle.seek(0)
            return _checked(decode(handle, fmt, name, page, limits), fmt, name)
    data, _ = load_bytes(source, limits.max_file_bytes)  # read whole, with the budget held even if the file grew
    fmt = _sniff(data[:HEAD_BYTES], name)
    return _checked(decode(data, fmt, name, page, limits), fmt, name)


def _sniff(head: bytes, name: str) -> str:
    """The format from the first bytes, or an ImageError for an empty file or one that is no image."""
    if not head:
        raise ImageError(f"{name}: the file is empty (0 bytes); the upload or copy failed, send the file again")
    fmt = sniff_format(head)
    if fmt is None:
        known = identify(head) or identify_by_name(name)
        if known:
            raise ImageError(f"{name}: not a recognised image (PNG, JPEG, TIFF, BMP, GIF, WebP); it is {known}")
        text = len(head) >= 8 and all(32 <= b < 127 or b in b"\t\r\n" for b in head[:64])
        hint = ("it looks like text or HTML (an error page saved as an image?)" if head[:1] in b"<{ \t\r\n"
                else f"it looks like text, not pixels (first bytes {head[:8]!r})" if text else f"first bytes {head[:8]!r}")
        raise ImageError(f"{name}: not a recognised image (PNG, JPEG, TIFF, BMP, GIF, WebP); {hint}; check how the file was produced")
    return fmt


def _checked(decoded: tuple[np.ndarray, dict], fmt: str, name: str) -> tuple[np.ndarray, str, dict]:
    image, info = decoded
    if image.size == 0 or image.ndim not in (2, 3):
        raise ImageError(f"{name}: the {fmt.upper()} decodes to an array of shape {tuple(image.shape)}; expected "
                         "(H, W) or (H, W, C) with at least one pixel. The header is damaged; export the image again")
    refuse_non_real(image, f"{name}: the {fmt.upper()}")
    return image, fmt, info


def refuse_non_real(image: np.ndarray, what: str) -> None:
    """An ImageError when ``image`` holds complex numbers or values that are no numbers: numpy would
    drop the imaginary part on the way to float, with a warning at most, and the mask be garbage."""
    if image.dtype.kind == "c":
        raise ImageError(f"{what} holds complex numbers ({image.dtype}: a Fourier transform or a phase image), not "
                         "intensities; use the magnitude, np.abs(array).astype(np.float32), or the part you mean "
                         "(array.real), and save it as a float32 TIFF")
    if image.dtype.kind not in "biuf":
        raise ImageError(f"{what} holds {image.dtype} values, not numbers a model takes; save the image as "
                         "unsigned integers or float32")


def _report(image: np.ndarray, fmt: str, name: str, info: dict) -> tuple[np.ndarray, ImageReport]:
    """The image as returned and its report: value range, NaN/Inf and bit depth exact (one or two passes
    over the pixels), the percentiles from a strided sample of large images."""
    problems: list[Problem] = []
    suffix = os.path.splitext(name)[1].lower() if name != "<bytes>" else ""
    if suffix and suffix not in EXTENSIONS.get(fmt, set()):
        problems.append(Problem("name_mismatch", f"the name ends in {suffix} but the content is {fmt.upper()}"))
    problems.extend(info.pop("problems"))
    image = _binary_to_uint8(image, problems)
    values, nonfinite = _extremes(image)
    problems.extend(_value_problems(image, values, nonfinite))
    found, sample = _percentiles(image)
    report = ImageReport(
        name=name, format=fmt, dtype=str(image.dtype), shape=tuple(image.shape),
        bit_depth=effective_bit_depth(image, top=values[1]), channels=1 if image.ndim == 2 else image.shape[2],
        value_range=values, percentiles=found, percentile_sample=sample, problems=tuple(problems), **info,
    )
    return image, report


def _binary_to_uint8(image: np.ndarray, problems: list[Problem]) -> np.ndarray:
    """A 1-bit image becomes uint8 0/255 (no reader downstream takes bool); it is probably a mask."""
    if image.dtype != np.bool_:
        return image
    problems.append(Problem("binary", "a 1-bit (black and white) image, read as 0/255: this looks like a mask, "
                            "not a micrograph; check that the right file was sent"))
    return image.astype(np.uint8) * 255


def value_problems(image: np.ndarray) -> list[Problem]:
    """What :func:`read_image` reports of an image's values (NaN/Inf, below zero, constant), for an
    array handed over as it is."""
    values, nonfinite = _extremes(image)
    return _value_problems(image, values, nonfinite) if image.size else []


def _value_problems(image: np.ndarray, values: tuple[float, float], nonfinite: int) -> list[Problem]:
    """Non-finite pixels (NaN/Inf), values below zero and a constant image (``values``: its finite
    min and max): all reach the model without an error."""
    problems = []
    if values[0] < 0:  # signed data: background-subtracted, CT, a difference image (counted only then)
        below = int(np.count_nonzero(image < 0))
        problems.append(Problem("negative", f"{below} pixels ({below / image.size:.2%}) below zero (minimum "
                                f"{values[0]:g}): the careful path keeps them negative, outside the 0..1 the "
                                "model was trained on, and the service's 8-bit conversion clips them to 0; "
                                "shift the data to start at zero (image - image.min()) or clip it at 0 if "
                                "the negatives are noise"))
    if nonfinite:
        problems.append(Problem("nonfinite", f"{nonfinite} NaN/Inf pixels ({nonfinite / image.size:.2%}): the model "
                                "output turns NaN around them; replace them (np.nan_to_num) or fix the export"))
    if image.size and values[0] == values[1]:
        problems.append(Problem("constant", f"every pixel has the value {values[0]:g}: there is nothing to "
                                "segment, and per-image standardisation would divide by zero"))
    return problems


_CV2_EXTREMES = frozenset(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32))  # no NaN to skip


def _extremes(image: np.ndarray) -> tuple[tuple[float, float], int]:
    """The finite (min, max) and the number of NaN/Inf values, exact: one pass for integers (OpenCV),
    numpy's min and max for the rest, where a NaN anywhere makes both NaN and an Inf is an extreme,
    so only then are the values looked at again."""
    if not image.size:
        return (0.0, 0.0), 0
    if image.dtype in _CV2_EXTREMES and image.flags.c_contiguous:  # one pass instead of two
        import cv2

        low, high = cv2.minMaxLoc(image.reshape(image.shape[0], -1))[:2]
        return (float(low), float(high)), 0
    low, high = _float_extremes(image)
    if not np.issubdtype(image.dtype, np.floating) or (np.isfinite(low) and np.isfinite(high)):
        return (low, high), 0
    finite = image[np.isfinite(image)]
    bad = int(image.size - finite.size)
    return ((float(finite.min()), float(finite.max())) if finite.size else (float("nan"), float("nan"))), bad


def _float_extremes(image: np.ndarray) -> tuple[float, float]:
    """min and max, NaN when any value is NaN: one pass with torch's ``aminmax`` (2.4 ms for a
    4096 x 4096 float32 image, numpy's min and max 4.2 ms) when torch is already imported and the
    array can be shared with it, else numpy's two passes (the isolation child does not import torch)."""
    torch = sys.modules.get("torch")
    if torch is not None and image.dtype in _TORCH_EXTREMES and image.flags.writeable and image.flags.c_contiguous:
        low, high = torch.aminmax(torch.from_numpy(image))
        return float(low), float(high)
    return float(image.min()), float(image.max())


_TORCH_EXTREMES = frozenset(np.dtype(t) for t in (np.float32, np.float64))


def value_range(image: np.ndarray) -> tuple[float, float]:
    """(min, max) ignoring NaN and Inf, exact; (0, 0) for an empty array, (nan, nan) when no value is finite."""
    return _extremes(image)[0]


EXACT_PERCENTILES = 1 << 18
"""Images with at most this many values (a 512x512 grey image) get percentiles of all their values."""
PERCENTILE_SAMPLE = 1 << 14
"""Larger images get them from a strided grid (every k-th row and column) of at least this many values."""


def _percentiles(image: np.ndarray) -> tuple[tuple[float, ...], int]:
    """p1, p50, p99 and how many values they came from when sampled (0 when from all of them)."""
    sample = image
    if image.size > EXACT_PERCENTILES:
        step = max(1, int(np.sqrt(image.size / PERCENTILE_SAMPLE)))  # rows and columns, every channel kept
        sample = image[::step, ::step]
    flat = sample.reshape(-1)
    if np.issubdtype(flat.dtype, np.floating):
        flat = flat[np.isfinite(flat)]
    found = _linear_percentiles(flat, PERCENTILES) if flat.size else ()
    return found, (flat.size if sample is not image else 0)


def _linear_percentiles(flat: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    """``np.percentile(flat, qs)`` (its default "linear" method, the same numbers) from one
    ``np.partition`` at the ranks needed, or for 8- and 16-bit values one ``np.bincount``:
    np.percentile's own bookkeeping cost 100 us a call."""
    positions = [q / 100 * (flat.size - 1) for q in qs]
    ranks = sorted({int(p) for p in positions} | {min(int(p) + 1, flat.size - 1) for p in positions})
    if flat.dtype in (np.uint8, np.uint16):  # the values at those ranks from a histogram: no sort at all
        cumulative = np.cumsum(np.bincount(flat))
        ordered = dict(zip(ranks, np.searchsorted(cumulative, ranks, side="right")))
    else:
        ordered = np.partition(flat, ranks)
    kind = flat.dtype.type if np.issubdtype(flat.dtype, np.floating) else np.float64  # where numpy subtracts
    found = []
    for position in positions:
        low = int(position)
        a, b = kind(ordered[low]), kind(ordered[min(low + 1, flat.size - 1)])
        step, t = float(b - a), position - low
        found.append(float(b) - step * (1 - t) if t >= 0.5 else float(a) + step * t)  # numpy's _lerp
    return tuple(found)


def percentiles(image: np.ndarray) -> tuple[float, ...]:
    """The 1st, 50th and 99th percentiles of the finite values: of all of them up to
    :data:`EXACT_PERCENTILES` values, else of a strided grid of at least :data:`PERCENTILE_SAMPLE`
    (percentiles of a 4096x4096 image cost 20 ms, of the grid 1 ms; they describe, they decide nothing)."""
    return _percentiles(image)[0]
