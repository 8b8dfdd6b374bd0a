"""Format-specific decoders behind :func:`mlbench.read_image`.

Each returns ``(array, info)`` where ``info`` holds the report fields it decided
(pages, page used, mode, axes, compression, orientation, alpha) and a list of
:class:`~mlbench.findings.Problem`. The pixel budget is checked from the header before any
pixel is decoded: PNG and JPEG sizes are parsed from the bytes here, TIFF sizes from
tifffile's header-only series.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import warnings
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import BinaryIO

import numpy as np

from mlbench.budgets import Budgets, Deadline
from mlbench.errors import ImageError
from mlbench.findings import Problem
from mlbench.image.formats import ImageHeader, bytes_io, check_header, pil_header, read_header, tiff_header
from mlbench.image.integrity import (check_jpeg_scans, check_png, gif_frame_problems, jpeg_fill_problems, tiff_damage,
                                     webp_frame_problems)

__all__ = ["decode", "decode_tiff", "decode_pil"]


def decode(source: bytes | BinaryIO, fmt: str, name: str, page: int, limits: Budgets) -> tuple[np.ndarray, dict]:
    """Dispatch on the sniffed format: TIFF to tifffile, everything else to Pillow (16-bit PNG to OpenCV).

    ``source`` is the file's bytes, or for the formats in :data:`~mlbench.image.formats.STREAMED`
    possibly the open file, at its start. The header is checked against ``limits`` first (pixels,
    decoded bytes, empty images; a TIFF's in :func:`decode_tiff`, on the one parse of its header),
    and a PNG's chunks and compressed rows against its header, in a second thread while the decoder runs.
    """
    if fmt != "tiff":
        header = read_header(source if isinstance(source, bytes) else _peek(source, 64), fmt)
        if header is not None:
            check_header(name, header, limits)
        if page != 0:
            raise ImageError(f"{name}: page {page} requested but a {fmt.upper()} file has one page; pass page=0")
    if fmt == "jpeg" and isinstance(source, bytes):
        check_jpeg_scans(source, name)
    if fmt == "png":
        return _decode_png(source, name, limits)
    if fmt == "tiff":
        return decode_tiff(source, name, page, limits)
    array, info = decode_pil(source, name, limits)
    if fmt == "jpeg":
        info["problems"] += jpeg_fill_problems(source, array, info["orientation"])
    elif fmt == "gif":
        info["problems"] += gif_frame_problems(source)
    elif fmt == "webp" and isinstance(source, bytes):
        info["problems"] += webp_frame_problems(source)
    return array, info


def _decode_png(data: bytes, name: str, limits: Budgets) -> tuple[np.ndarray, dict]:
    """A PNG's row check (:func:`check_png`, a second inflate) in a worker thread while the decoder
    runs: both release the GIL, so on two cores the check costs nothing (``bench/read_image.py``).
    The header's budgets were checked before, so the decoder's work is bounded even on a file the
    check then refuses; the check's error wins, as it names the damage the decoder may paper over."""
    checking = _background().submit(check_png, data, name, Deadline(limits.max_seconds, ImageError))
    try:
        decoded = decode_pil(data, name, limits)
    except BaseException:
        checking.result()
        raise
    checking.result()
    bits, colour_type = (data[24], data[25]) if len(data) > 25 else (8, 0)
    if colour_type == 0 and bits in (2, 4):  # grey below a byte: PIL (the service's reader) rescales it
        step = 255 // (2 ** bits - 1)
        decoded[1]["problems"].append(Problem("samples_scaled", f"{bits}-bit grey samples scaled to 0..255 by the "
                                              f"decoder, as PIL and the service read them: 0..{2 ** bits - 1} became "
                                              f"multiples of {step}; for a label image divide by {step} to get the "
                                              "labels back"))
    return decoded


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _background() -> ThreadPoolExecutor:
    """The thread pool of this process (a forked child makes its own: its parent's threads did not come along)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="mlbench-png-rows"))
    return _POOL[1]


def _peek(handle: BinaryIO, size: int) -> bytes:
    """The first ``size`` bytes of an open file, which is left at its start."""
    head = handle.read(size)
    handle.seek(0)
    return head


def _plane_layout(axes: str, shape: tuple[int, ...]) -> tuple[str | None, list[int]]:
    """The channel axis (S, or C with at most 4 entries) and the sizes of the other non-YX axes."""
    channel = "S" if "S" in axes else ("C" if "C" in axes and shape[axes.index("C")] <= 4 else None)
    others = [n for a, n in zip(axes, shape) if a not in "YX" and a != channel]
    return channel, others


def _check_plane(tif, name: str, plane: list[tuple[str, int]], limits: Budgets,
                 decoded: Collection[int] | None = None) -> list[int]:
    """The budgets and the header's own consistency, for the plane (``(axis, size)`` pairs) about to be
    decoded from pages ``decoded`` (None: all); the other pages that the end of the file cuts."""
    first = tif.pages[0]
    if first.dtype is None:
        raise ImageError(f"{name}: BitsPerSample {first.bitspersample} with SampleFormat {int(first.sampleformat)} "
                         "is no pixel type (expected 1, 8, 16, 32 or 64 bits); the header is damaged, export the "
                         "image again")
    sizes = dict(plane)
    channels = int(np.prod([n for a, n in plane if a not in "YX"]))
    check_header(name, ImageHeader(sizes["Y"], sizes["X"], max(channels, 1), first.dtype.itemsize), limits)
    return tiff_damage(tif, name, decoded)


def _check_first_page(tif, name: str, limits: Budgets) -> None:
    """The budgets and an empty size, from the first page's header, before any plane is looked at (a
    header too odd to read is left to :func:`_check_plane`, which names the field); a file without a page."""
    if not len(tif.pages):
        raise ImageError(f"{name}: the TIFF holds no image: its header is intact but lists no page (the export "
                         "stopped before writing one, or the file was cut right after its header); export it again")
    try:
        header = tiff_header(tif)
    except Exception:
        return
    check_header(name, header, limits)


def _full_pages(tif) -> list[int]:
    """Indexes of the pages that are images, not reduced-resolution copies (a thumbnail, a pyramid's
    levels: NewSubfileType bit 0); all pages when every one is marked."""
    full = [i for i, p in enumerate(tif.pages) if not int(getattr(p, "subfiletype", 0) or 0) & 1]
    return full or list(range(len(tif.pages)))


def _read_tiff(tif, name: str, page: int, limits: Budgets) -> tuple[np.ndarray, dict, list[Problem]]:
    """Plane ``page`` of the file, its ``axes`` and the number of ``planes`` (full-resolution pages, or
    the planes of one shaped series), and what is worth a problem so far."""
    series = tif.series[0]
    problems = []
    full = _full_pages(tif) if len(tif.series) > 1 else []
    if len(tif.series) > 1:  # separately written pages: each full-resolution page is one plane
        if len(full) < len(tif.pages):
            problems.append(Problem("reduced_pages_skipped", f"{len(tif.pages) - len(full)} reduced-resolution page(s) "
                                    "(a thumbnail or a pyramid's levels) skipped; the pages counted are the full images"))
        pages, single, packed = len(full), False, False
        first = tif.pages[full[min(page, pages - 1)]]
        axes, shape = first.axes, first.shape
        channel, planes = _plane_layout(axes, shape)[0], pages
    else:
        axes, shape = series.axes, series.shape
        channel, others = _plane_layout(axes, shape)
        planes = int(np.prod(others)) if others else 1
        single = planes == 1  # as the file describes it, before any cut
        packed = not single and _holds_planes(tif.pages[0], axes, shape, channel)
        needed = int(np.prod([n for a, n in zip(axes, shape) if a not in "YXS"]))
        readable = min(len(series.pages), len(tif.pages))
        contiguous = planes > 1 and readable < needed and not packed and _contiguous(tif, series, axes, channel)
        if planes > 1 and readable < needed and not packed and not contiguous:
            usable = readable * planes // needed  # the pages after the cut are lost
            if not 0 <= page < usable:
                raise ImageError(f"{name}: page {page} requested, but the TIFF is truncated: it describes {planes} pages "
                                 f"and only the first {usable} can be read; pass page=0..{max(usable - 1, 0)}, or copy "
                                 "or export the file again for the rest")
            problems.append(Problem("pages_missing", f"the file describes {planes} pages but only the first {usable} "
                                    "can be read: it is truncated after them; copy or export it again"))
            planes = usable
    if not 0 <= page < planes:
        raise ImageError(f"{name}: page {page} requested but the file has {planes} page(s); pass page=0..{planes - 1}")
    contiguous = len(tif.series) == 1 and not single and contiguous
    whole = single or len(tif.series) > 1 or packed  # planes stored together are decoded together
    decoded = ([full[page]] if len(tif.series) > 1 else [0] if contiguous else None if whole else
               [series.pages[key].index for key in _plane_keys(axes, shape, channel, page)])
    cut = _check_plane(tif, name, [(a, n) for a, n in zip(axes, shape) if whole or a in "YXS" or a == channel], limits,
                       decoded)
    if cut:
        problems.append(Problem("pages_cut", f"the end of the file cuts page(s) {cut[:8]}, whose pixels are lost: the "
                                "file is truncated; the page read is whole; copy or export it again for the rest"))
    if len(tif.series) > 1:
        array, axes = tif.pages[full[page]].asarray(), tif.pages[full[page]].axes
    elif single:
        array = series.asarray()
    elif contiguous:  # ImageJ's stacks over 4 GB: one page, the planes one after another behind it
        kept = [(a, n) for a, n in zip(axes, shape) if a in "YXS" or a == channel]
        count = int(np.prod([n for _, n in kept]))
        dtype = np.dtype(series.dtype).newbyteorder(tif.byteorder)
        tif.filehandle.seek(series.dataoffset + page * count * dtype.itemsize)
        array = tif.filehandle.read_array(dtype, count).reshape([n for _, n in kept]).astype(series.dtype)
        axes = "".join(a for a, _ in kept)
    elif packed:  # a stack of N x 1 planes that tifffile packs into one page
        index = _plane_index(axes, shape, channel, page)
        array = series.asarray()[tuple(int(index[a]) if a in index else slice(None) for a in axes)]
        axes = "".join(a for a in axes if a in "YXS" or a == channel)
    else:
        keys = _plane_keys(axes, shape, channel, page)
        array = series.asarray(key=keys if len(keys) > 1 else keys[0])
        axes = "".join(a for a in axes if a in "YXS" or a == channel)
    if len(axes) != array.ndim:  # tifffile left out an axis of length 1 (a plane of a Z x 1 x Y x X stack)
        single_axes = {a for a, n in zip(series.axes if len(tif.series) == 1 else axes, shape) if n == 1}
        axes = "".join(a for a in axes if a in "YX" or a not in single_axes)
    if len(axes) == array.ndim and array.ndim > 2:  # (1, 1, H, W) as models' outputs are saved: the 1s say nothing
        kept = [i for i, (a, n) in enumerate(zip(axes, array.shape)) if n != 1 or a in "YX"]
        array, axes = array.reshape([array.shape[i] for i in kept]), "".join(axes[i] for i in kept)
    if len(axes) != array.ndim:
        raise ImageError(f"{name}: the TIFF's axes {axes!r} do not match the shape {array.shape} its page decodes to: the "
                         "file's metadata (ImageJ or OME) disagrees with its pages; export the image again")
    if channel == "C" and "C" in axes and axes.index("C") < axes.index("Y"):
        problems.append(Problem("channels_first", f"{array.shape[axes.index('C')]} channels stored first (axes "
                                f"{series.axes}), moved last; PIL and the service see only the first channel"))
    return array, {"axes": axes, "planes": planes, "page_index": full[page] if len(tif.series) > 1 else 0}, problems


def _contiguous(tif, series, axes: str, channel: str | None) -> bool:
    """Whether a shaped series with fewer pages than planes holds them all one after another behind
    its first page, uncompressed and whole (ImageJ writes stacks over 4 GB so, with one page and
    ``images=N``); the planes' axes must come before the kept ones, so each plane is one run of bytes."""
    first = tif.pages[0]
    kept = [i for i, a in enumerate(axes) if a in "YXS" or a == channel]
    return (bool(tif.is_imagej) and series.dataoffset is not None and int(first.compression) == 1
            and series.dataoffset + series.nbytes <= tif.filehandle.size and kept == list(range(kept[0], len(axes))))


def _plane_index(axes: str, shape: tuple[int, ...], channel: str | None, page: int) -> dict[str, int]:
    """Plane ``page``'s index along each axis of a shaped series that is neither Y, X, S nor the channel."""
    others = [(a, n) for a, n in zip(axes, shape) if a not in "YXS" and a != channel]
    return dict(zip([a for a, _ in others], map(int, np.unravel_index(page, [n for _, n in others]))))


def _plane_keys(axes: str, shape: tuple[int, ...], channel: str | None, page: int) -> list[int]:
    """The indexes, in the series' pages, of plane ``page``'s pages (one per channel stored as pages)."""
    page_axes = [a for a in axes if a not in "YXS"]
    page_shape = [shape[axes.index(a)] for a in page_axes]
    index = _plane_index(axes, shape, channel, page)
    n_channels = shape[axes.index(channel)] if channel in page_axes else 1
    return [int(np.ravel_multi_index([c if a == channel else index[a] for a in page_axes], page_shape))
            for c in range(n_channels)]


def _holds_planes(first, axes: str, shape: tuple[int, ...], channel: str | None) -> bool:
    """Whether a shaped series' first page holds more than one plane (tifffile packs a stack of
    N x 1 planes into one page): more samples than a plane of the series has."""
    plane = int(np.prod([n for a, n in zip(axes, shape) if a in "YXS" or a == channel]))
    return int(np.prod(first.shape)) > plane


class _TifffileLog(logging.Filter):
    """tifffile logs what it skips in a damaged file (a tag of an invalid type, a page without an
    image) instead of raising. While :func:`_tifffile_log` runs in a thread, those lines go to its
    list, for the report, not to stderr; other threads' lines pass as usual."""

    local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        lines = getattr(self.local, "lines", None)
        if lines is None:
            return True
        lines.append(record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_TifffileLog())


@contextmanager
def _tifffile_log() -> Iterator[list[str]]:
    """Collect tifffile's log lines in this thread while the block runs."""
    _TifffileLog.local.lines = lines = []
    try:
        yield lines
    finally:
        _TifffileLog.local.lines = None


def _said(log: list[str], most: int = 3) -> str:
    """tifffile's log lines, at most ``most`` of them, as one clause."""
    more = f" (and {len(log) - most} more)" if len(log) > most else ""
    return "tifffile logged: " + "; ".join(line[:200] for line in log[:most]) + more


def decode_tiff(source: bytes | BinaryIO, name: str, page: int, limits: Budgets) -> tuple[np.ndarray, dict]:
    """Decode one plane of a TIFF (its bytes or the open file) with tifffile, keeping dtype and
    reporting pages, axes and compression; what tifffile logs about the file goes into the report."""
    import tifffile

    log: list[str] = []
    try:
        opened = bytes_io(source) if isinstance(source, bytes) else source
        with _tifffile_log() as log, tifffile.TiffFile(opened, name=os.path.basename(name)) as tif:
            _check_first_page(tif, name, limits)
            array, info, problems = _read_tiff(tif, name, page, limits)
            pages = info["planes"]
            compression = tif.pages[0].compression.name.lower()
            info["alpha"] = _tiff_has_alpha(tif.pages[0])
            colour = _tiff_colour(tif.pages[info["page_index"]])
    except ImageError:
        raise
    except Exception as exc:  # tifffile raises many types for damaged files
        if "requires the 'imagecodecs' package" in str(exc):
            raise ImageError(f"{name}: the TIFF is compressed ({exc}); the codec is missing here, not the file "
                             "damaged: pip install imagecodecs") from exc
        logged = f"; {_said(log)}" if log else ""
        raise ImageError(f"{name}: the TIFF cannot be decoded ({type(exc).__name__}: {exc}{logged}); "
                         "the file is damaged or truncated, export it again") from exc
    if log:
        problems.append(Problem("decoder_log", f"{_said(log)}: parts of the file are damaged or unusual; the pixels "
                                "read may be incomplete, export it again if the image looks wrong"))
    if pages > 1:
        problems.append(Problem("multi_page", f"{pages} pages; page {page} used, the others ignored"))
    array = _to_channels_last(np.asarray(array), info["axes"])
    array = _as_stored_colour(array, colour, problems)
    orientation = colour["orientation"] if 1 <= colour["orientation"] <= 8 else 1
    if orientation != 1:
        array = np.ascontiguousarray(_apply_orientation(array, orientation))
        problems.append(Problem("exif_rotated", f"TIFF Orientation tag {orientation} applied; the service ignores it "
                                "and sees the image as stored"))
    if colour["photometric"] == "RGB" and colour["extra"] >= 2 and array.ndim == 3 and array.shape[2] > 4:
        problems.append(Problem("extra_samples_dropped", f"{array.shape[2] - 3} extra samples after red, green and "
                                "blue (ExtraSamples) dropped: the image is RGB, as PIL and the service read it"))
        array = np.ascontiguousarray(array[..., :3])
    array, alpha = _drop_alpha(array, known_alpha=info["alpha"])
    if alpha:
        problems.append(Problem("alpha_dropped", "an alpha channel was present and dropped"))
    array = _keep_first_channel(array, problems)
    if array.ndim == 3 and array.shape[2] == 3 and "C" in info["axes"].upper() and \
            not any(p.code == "channels_as_rgb" for p in problems):
        problems.append(Problem("channels_as_rgb", "3 channels stored as separate planes (axes "
                                f"{info['axes']}: stains or fluorescence channels, not a colour photo) go to the model "
                                "as red, green and blue; check that their order is the one the model was trained on, "
                                "or pass one channel"))
    return array, {"pages": pages, "page_used": page, "mode": info["axes"], "axes": info["axes"],
                   "compression": compression, "orientation": orientation, "alpha": alpha, "problems": problems}


def _tiff_colour(page) -> dict:
    """What a TIFF page says about the meaning of its samples: photometric interpretation, colour
    map, samples per pixel and the Orientation tag (1: as stored)."""
    photometric = getattr(page.photometric, "name", str(page.photometric))
    tag = page.tags.get(274)
    colormap = page.colormap if photometric == "PALETTE" else None
    return {"photometric": photometric, "samples": int(page.samplesperpixel), "colormap": colormap,
            "orientation": int(tag.value) if tag is not None and isinstance(tag.value, int) else 1,
            "extra": len(tuple(getattr(page, "extrasamples", ()) or ()))}


def _as_stored_colour(array: np.ndarray, colour: dict, problems: list[Problem]) -> np.ndarray:
    """The pixels as PIL (the service's reader) sees them where the photometric interpretation is not
    plain grey or RGB: MinIsWhite inverted, CMYK converted to RGB; a palette's indices kept and
    said, as for PNG; three samples that are not RGB (MinIsBlack, CIELab, YCbCr) said."""
    photometric = colour["photometric"]
    if photometric == "MINISWHITE" and np.issubdtype(array.dtype, np.unsignedinteger) and array.ndim == 2:
        problems.append(Problem("min_is_white", "stored MinIsWhite (0 is white): inverted, so that 0 is black, as "
                                "PIL and the service read it"))
        return np.iinfo(array.dtype).max - array
    if photometric == "MINISWHITE" and array.dtype == np.bool_:
        problems.append(Problem("min_is_white", "stored MinIsWhite (0 is white): inverted, as PIL reads it"))
        return ~array
    if photometric == "MINISWHITE":
        problems.append(Problem("min_is_white", f"stored MinIsWhite (0 is white) as {array.dtype} with "
                                f"{1 if array.ndim == 2 else array.shape[2]} sample(s): returned as stored, not inverted "
                                "(there is no maximum to invert from); bright means dark here"))
        return array
    if photometric == "PALETTE":
        entries = colour["colormap"].shape[-1] if colour["colormap"] is not None else 0
        problems.append(Problem("palette", f"palette image: the {entries} palette indices are returned; as served, "
                                "convert('RGB') maps them to colours"))
    elif photometric == "SEPARATED" and array.ndim == 3 and array.shape[2] - colour["extra"] == 4:
        if array.dtype == np.uint8:  # PIL's conversion: each of R, G, B is (255 - C, M, Y) * (255 - K) / 255, rounded
            cmy, k = array[..., :3].astype(np.uint32), array[..., 3:4].astype(np.uint32)
            product = (255 - cmy) * (255 - k) + 128
            extra = f"; its {array.shape[2] - 4} extra sample(s) dropped" if array.shape[2] > 4 else ""
            problems.append(Problem("cmyk", f"CMYK converted to RGB{extra}"))
            return ((product + (product >> 8)) >> 8).astype(np.uint8)
        problems.append(Problem("cmyk", f"{array.dtype} CMYK (ink amounts, not light): channel 0 is cyan, not grey; "
                                "export the image as RGB or as the single channel the model was trained on"))
    elif photometric in ("MINISBLACK", "CIELAB", "ICCLAB", "ITULAB", "YCBCR") and array.ndim == 3 \
            and array.shape[2] == 3:
        kind = "grey channels (MinIsBlack: stains or fluorescence)" if photometric == "MINISBLACK" else f"{photometric} colour"
        problems.append(Problem("channels_as_rgb", f"3 samples of {kind}, not RGB, go to the model as red, green and "
                                "blue; convert to RGB, or check that their order is the one the model was trained on"))
    return array


def _to_channels_last(array: np.ndarray, axes: str) -> np.ndarray:
    """Reorder a single-plane array to (H, W) or (H, W, C) from tifffile's axes string."""
    axes = axes.upper()
    if array.ndim == 3 and axes[0] in "SC" and array.shape[0] <= 4:
        return np.ascontiguousarray(np.moveaxis(array, 0, -1))
    if array.ndim == 3 and axes[-1:] not in ("S", "C") and array.shape[0] <= 4 < array.shape[2]:  # channels read as pages, axes lost
        return np.ascontiguousarray(np.moveaxis(array, 0, -1))
    return array


def _tiff_has_alpha(page) -> bool:
    """Whether a TIFF's extra sample is alpha (ExtraSamples 1 or 2, or RGB with a fourth sample)."""
    extra = tuple(int(v) for v in (getattr(page, "extrasamples", ()) or ()))
    rgb_plus_one = getattr(page.photometric, "name", "") == "RGB" and page.samplesperpixel == 4
    return any(v in (1, 2) for v in extra) or rgb_plus_one


def _drop_alpha(array: np.ndarray, known_alpha: bool = True) -> tuple[np.ndarray, bool]:
    """Drop the alpha of a grey+alpha or RGBA array; ``known_alpha=False`` when the format says it is not alpha."""
    if known_alpha and array.ndim == 3 and array.shape[2] in (2, 4):
        return (array[..., :-1] if array.shape[2] == 4 else array[..., 0]), True
    return array, False


def _others(n: int) -> str:
    return "channel 1" if n == 2 else f"channels 1..{n - 1}"


def _keep_first_channel(array: np.ndarray, problems: list[Problem]) -> np.ndarray:
    """Channels that are neither grey nor RGB (e.g. two fluorescence stains): keep channel 0 and say so."""
    if array.ndim == 3 and array.shape[2] == 1:
        return array[..., 0]
    if array.ndim == 3 and array.shape[2] != 3:
        problems.append(Problem("channels_dropped", f"{array.shape[2]} channels that are neither RGB nor alpha: "
                                f"channel 0 used as grey, {_others(array.shape[2])} ignored; export the "
                                "stain the model was trained on as a single-channel image"))
        return np.ascontiguousarray(array[..., 0])
    return array


_PIL_ARRAY_MODES = {"I;16": np.uint16, "I;16B": np.uint16, "I;16L": np.uint16, "I": np.int32, "F": np.float32}


def _open_pil(source: bytes | BinaryIO, name: str, limits: Budgets, load: bool = True):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(bytes_io(source) if isinstance(source, bytes) else source)
            check_header(name, pil_header(image), limits)
            if load:
                image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name}: refused as a decompression bomb ({exc}); downscale the image") from exc
    except Exception as exc:
        precision = _jpeg_precision(source) if isinstance(source, bytes) else None
        if precision not in (None, 8):
            raise ImageError(f"{name}: a {precision}-bit JPEG, which Pillow (and the service, which answers 500) cannot "
                             "open; it is not damaged: convert it to a 16-bit PNG or TIFF (imagecodecs.jpeg8_decode reads "
                             "it as uint16)") from exc
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(exc))  # "<_io.BytesIO object at 0x7f...>": no addresses
        reason = "truncated (the file ends early)" if "truncated" in text.lower() else f"damaged ({type(exc).__name__}: {text})"
        raise ImageError(f"{name}: the image is {reason}; copy or export the file again") from exc
    return image


def _jpeg_precision(data: bytes) -> int | None:
    """The sample precision in a JPEG's first start-of-frame segment (8, 12 or 16 bits), None when not found."""
    at = 2
    while 0 <= at < min(len(data), 1 << 20) - 9 and data[at] == 0xFF:
        marker = data[at + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            return data[at + 4]
        if marker == 0xFF:
            at += 1
            continue
        at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
    return None


def _png_16bit_colour(data: bytes) -> bool:
    """True for a 16-bit PNG with colour or alpha, which Pillow would open as 8-bit."""
    return data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 4, 6)


def _decode_cv2_16(data: bytes, name: str) -> np.ndarray:
    import cv2

    array = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ImageError(f"{name}: the 16-bit PNG cannot be decoded; the file is damaged, export it again")
    if data[25] == 4 and array.ndim == 3 and array.shape[2] == 4:  # grey + alpha, which OpenCV expands to BGRA
        return np.ascontiguousarray(array[..., [0, 3]])
    if array.ndim == 3:  # OpenCV orders colour as BGR(A)
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[2] == 4 else cv2.COLOR_BGR2RGB)
    return array


def _png_orientation(data: bytes, image) -> int:
    """The EXIF orientation of a PNG not decoded by Pillow: asking Pillow for the EXIF of a PNG
    without an eXIf chunk before its rows decodes the whole image, to look for one after them;
    here only the bytes after the last ``IDAT`` are searched."""
    if "exif" not in image.info and data.find(b"eXIf", max(data.rfind(b"IDAT"), 0)) < 0:
        return 1
    return int(image.getexif().get(0x0112, 1) or 1)


def _apply_orientation(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an (H, W[, C]) array upright from its EXIF orientation (1..8), as ``ImageOps.exif_transpose`` does."""
    transposed = np.swapaxes(array, 0, 1)
    upright = {2: array[:, ::-1], 3: array[::-1, ::-1], 4: array[::-1], 5: transposed,
               6: transposed[:, ::-1], 7: transposed[::-1, ::-1], 8: transposed[::-1]}.get(orientation, array)
    return np.ascontiguousarray(upright)


def decode_pil(source: bytes | BinaryIO, name: str, limits: Budgets) -> tuple[np.ndarray, dict]:
    """Decode PNG, JPEG, BMP, GIF or WebP (bytes, or a BMP's open file) with Pillow, detecting
    truncation (16-bit colour PNG via OpenCV)."""
    from PIL import ImageOps

    colour16 = isinstance(source, bytes) and _png_16bit_colour(source)
    image = _open_pil(source, name, limits, load=not colour16)  # a full decode raises on truncation
    problems: list[Problem] = []
    frames = getattr(image, "n_frames", 1)
    mode = image.mode
    if colour16:  # Pillow would decode it as 8-bit: OpenCV does (libpng refuses rows the data lacks)
        orientation = _png_orientation(source, image)
        array = _apply_orientation(_decode_cv2_16(source, name), orientation)
        mode = "LA;16" if array.shape[-1] == 2 else "RGB;16"
    else:
        orientation = int(image.getexif().get(0x0112, 1) or 1)
        if not 1 <= orientation <= 8:
            problems.append(Problem("exif_invalid", f"EXIF orientation {orientation} is no valid value (1..8): ignored, "
                                    "the image is used as stored, as the service does"))
            orientation = 1
        if orientation != 1:
            image = ImageOps.exif_transpose(image)
        if mode == "P":
            problems.append(Problem("palette", f"palette image: the {len(image.getpalette() or []) // 3} palette indices "
                                    "are returned; as served, convert('RGB') maps them to colours"))
        elif mode == "CMYK":
            image = image.convert("RGB")
            problems.append(Problem("cmyk", "CMYK converted to RGB"))
        elif mode in ("LA", "PA", "La"):
            image = image.convert("RGBA" if mode == "PA" else "LA")
        dtype = _PIL_ARRAY_MODES.get(image.mode)
        array = np.asarray(image, dtype=dtype) if dtype else np.asarray(image)
    if orientation != 1:
        problems.append(Problem("exif_rotated", f"EXIF orientation {orientation} applied; the service ignores it "
                                "and sees the image as stored"))
    if frames > 1:
        problems.append(Problem("multi_page", f"{frames} frames; frame 0 used, the others ignored"))
    array, alpha = _drop_alpha(array)
    if alpha:
        problems.append(Problem("alpha_dropped", "an alpha channel was present and dropped"))
    return np.ascontiguousarray(array), {"pages": frames, "page_used": 0, "mode": mode, "orientation": orientation,
                                         "alpha": alpha, "problems": problems}
