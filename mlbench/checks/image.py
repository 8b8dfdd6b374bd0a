"""``check_image``: what the careful reader finds in an image, and what ``as_served`` would do to it.

The careful reader (:func:`mlbench.read_image`) keeps 16-bit, 12-bit-in-16 and float data; the
service decoded with ``PIL.Image.open(...).convert('RGB')``. :func:`check_image` runs both (the
served decode is the pipeline's own, :func:`mlbench.pipeline.stages._pil_decode`, not a copy) and writes
the differences into the report: "16-bit clipped at 255: 94% of pixels saturate".
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import replace

import numpy as np

from mlbench.budgets import Budgets, open_regular
from mlbench.budgets import budgets as budgets_in_force
from mlbench.errors import ImageError, MlbenchError, OptionsError
from mlbench.findings import Problem
from mlbench.image.formats import IMAGE_SOURCES, ImageSource, load_bytes, sniff_format
from mlbench.image.other_formats import HEAD_BYTES, identified_name
from mlbench.image.read import ImageReport, read_image

__all__ = ["check_image", "served_decode", "add_check_image_command"]

_ERROR_CODES = (("codec is missing", "codec_missing"), ("not a regular file", "not_a_file"),
                ("does not exist", "missing"), ("is empty", "empty"), ("not a recognised image", "not_an_image"),
                ("exceeds the limit", "too_large"), ("exceeds the budget", "too_large"),
                ("decompression bomb", "too_large"), ("invent or drop rows", "corrupt_header"),
                ("empty image", "corrupt_header"), ("fails its CRC", "corrupt"), ("truncated", "truncated"),
                ("crashed the child process", "decoder_crashed"))


def served_decode(data: bytes) -> np.ndarray:
    """The image as the ``as_served`` pipeline's decode stage returns it (PIL, ``convert('RGB')``).

    Returns
    -------
    image : (H, W, 3) uint8 array
    """
    from mlbench.pipeline.options import make_options
    from mlbench.pipeline.stages import StageContext, _pil_decode

    return _pil_decode(StageContext(options=make_options("as_served"), model=None, source=data)).image


def _error_report(name: str, fmt: str, exc: Exception) -> ImageReport:
    code = next((c for key, c in _ERROR_CODES if key in str(exc)), "unreadable")
    return ImageReport(name=name, format=fmt, dtype="", shape=(), bit_depth=0, channels=0,
                       problems=(Problem(code, str(exc)),))


def _served_findings(image: np.ndarray, report: ImageReport, served: np.ndarray) -> tuple[list[Problem], list[str]]:
    """Problems and notes from comparing the careful decode with the served one."""
    problems: list[Problem] = []
    notes = [f"decoded as {tuple(served.shape)} {served.dtype}, values {int(served.min())}..{int(served.max())}"]
    saturated = float(np.all(served == 255, axis=-1).mean()) if served.ndim == 3 else float((served == 255).mean())
    if np.issubdtype(image.dtype, np.floating):
        if served.max() <= 1:
            problems.append(Problem("served_black", f"float image (values {report.value_range[0]:.3g}.."
                                    f"{report.value_range[1]:.3g}) becomes black: convert('RGB') truncates it to 0..1 of 255"))
    elif image.dtype.itemsize > 1 and served.dtype == np.uint8:
        if saturated > 0.01:
            problems.append(Problem("served_clipped", f"{report.bit_depth}-bit clipped at 255: "
                                    f"{saturated:.0%} of pixels saturate"))
        elif report.bit_depth > 8:
            notes.append(f"{report.bit_depth}-bit data reduced to 8 bits")
    if report.orientation != 1:
        problems.append(Problem("served_orientation", f"EXIF orientation {report.orientation} ignored: the service sees "
                                f"{served.shape[0]}x{served.shape[1]} as stored, not {image.shape[0]}x{image.shape[1]}"))
    if report.pages > 1:
        notes.append(f"only the first of {report.pages} pages is used")
    if report.alpha:
        notes.append("alpha dropped without compositing")
    height, width = served.shape[:2]
    if height != width:
        notes.append(f"stretched to a square input: aspect {width}:{height} becomes 1:1")
    notes.append("then /255 without ImageNet mean/std (see 05_normalization)")
    return problems, notes


def _head(source: ImageSource) -> bytes:
    """The first bytes of a path or bytes, for the format name of a report; empty when unreadable."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source[:HEAD_BYTES])
    try:
        with open_regular(source, ImageError) as handle:
            return handle.read(HEAD_BYTES)
    except MlbenchError:
        return b""


def check_image(source: ImageSource, *, max_pixels: int | None = None, budgets: Budgets | None = None,
                isolate: bool = True) -> ImageReport:
    """Inspect an image file (or its bytes): the careful reading plus what ``as_served`` would do.

    Never raises for a bad file: missing, empty, truncated, non-image or oversized files come
    back as a report with ``ok`` False and a problem code (``missing``, ``not_a_file`` (a FIFO,
    a device ...), ``empty``, ``truncated``, ``not_an_image``, ``too_large`` (over a budget),
    ``corrupt_header`` (rows the data does not hold), ``corrupt``, ``decoder_crashed`` (the decoder
    killed its child process), ``unreadable``).

    Parameters
    ----------
    source : path or bytes
        The image file or its raw bytes.
    max_pixels : int, optional
        Pixel budget, checked from the header before decoding (default the ``max_pixels`` budget).
    budgets : Budgets, optional
        Every bound on the read (:class:`mlbench.budgets.Budgets`), as in :func:`mlbench.read_image`.
    isolate : bool
        Run the careful decode in a child process with the ``max_decoder_memory`` and ``max_seconds``
        budgets as limits (default True: files handed to an inspector are untrusted, and a decoder
        crash becomes the problem ``decoder_crashed``, not a dead kernel). The ``as_served`` decode
        runs here, after the careful one has read the same bytes without harm.

    Returns
    -------
    ImageReport
        With ``served`` notes and ``served_*`` problems (``served_clipped``, ``served_black``,
        ``served_orientation``, ``served_fails``).

    Raises
    ------
    OptionsError
        When ``source`` is neither a path nor bytes.
    """
    if not isinstance(source, IMAGE_SOURCES):
        raise OptionsError(f"check_image expects a path or bytes, got {type(source).__name__}; "
                           "an array in memory is reported by the decode stage of mb.Pipeline(model).start(array)")
    name = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        image, report = read_image(source, max_pixels=max_pixels, budgets=budgets, isolate=isolate)
        data, _ = load_bytes(source, budgets_in_force(budgets).max_file_bytes)
    except ImageError as exc:
        head = _head(source)
        other = identified_name(head)
        return _error_report(name, sniff_format(head) or (f"not an accepted image: {other}" if other else "unknown"),
                             exc)
    try:
        problems, notes = _served_findings(image, report, served_decode(data))
    except Exception as exc:  # PIL cannot open what the careful reader can: the service answers 500
        reason = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))  # "<_io.BytesIO object at 0x7f...>": no addresses
        problems = [Problem("served_fails", f"the as_served decode fails ({type(exc).__name__}: {reason}); "
                            "the service would answer 500")]
        notes = ["decode fails"]
    return replace(report, problems=report.problems + tuple(problems), served=tuple(notes))


def add_check_image_command(sub) -> None:
    """Register ``mlbench check-image PATH... [--json] [--max-pixels N]`` on argparse sub-parsers."""
    p = sub.add_parser("check-image", help="inspect image files: format, bit depth, pages, what as_served does")
    p.add_argument("paths", nargs="+", help="image files")
    p.add_argument("--json", action="store_true", help="print one JSON object per file (one per line)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="pixel budget checked from the header (default 64,000,000; see mlbench.budgets)")
    p.add_argument("--in-process", action="store_true",
                   help="decode in this process (faster for many small files) instead of a child process with "
                        "memory and time limits (the default: a decoder crash is reported, the check goes on)")
    p.set_defaults(run=run_check_image)


def run_check_image(args: argparse.Namespace) -> int:
    """Handler of ``check-image``: exit status 1 when any file has a problem, else 0."""
    status = 0
    for path in args.paths:
        try:
            report = check_image(path, max_pixels=args.max_pixels, isolate=not getattr(args, "in_process", False))
        except Exception as exc:  # one file must not stop the others; check_image should never get here
            report = _error_report(path, "unknown", ImageError(f"{path}: the check failed ({type(exc).__name__}: "
                                                                f"{exc}); the file was skipped, please report it"))
        print(json.dumps(report.to_dict()) if args.json else str(report), flush=True)
        status = status or int(not report.ok)
    return status
