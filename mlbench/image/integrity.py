"""Does the file hold the pixels its header announces? Checks that catch invented rows.

Decoders trust the header: a PNG or compressed TIFF whose height was changed decodes to the new
height, the missing rows filled with zeros, and libjpeg fills a JPEG's missing rows with one
flat value, all without an error. These checks compare the header with the data behind it:

- PNG: every chunk's CRC, and the inflated rows against the IHDR's (streamed, nothing kept);
  a mismatch is an :class:`~mlbench.errors.ImageError`.
- TIFF: the strips or tiles present against those the header's size needs, and for uncompressed
  data their bytes; an ImageError.
- JPEG: a band of one flat value from an MCU row boundary to the bottom, libjpeg's fill for
  missing data; a problem (``ok`` False), as a real image could end in a flat band.
- GIF: a first frame that does not cover the logical screen (the rest is background); a problem.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection

import numpy as np

try:  # ISA-L inflates PNG rows about 2x faster than zlib: the row check is a second inflate of every PNG
    from isal.isal_zlib import decompressobj as _decompressobj
    from isal.isal_zlib import error as _InflateError
except ImportError:  # the same stream through zlib
    from zlib import decompressobj as _decompressobj
    from zlib import error as _InflateError

from mlbench.budgets import Deadline
from mlbench.errors import ImageError
from mlbench.findings import Problem

__all__ = ["check_png", "tiff_damage", "check_jpeg_scans", "jpeg_fill_problems", "gif_frame_problems",
           "webp_frame_problems"]

_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def _png_raw_bytes(width: int, height: int, depth: int, colour: int, interlaced: bool) -> int:
    """Bytes of a PNG's filtered rows (one filter byte per row), per pass when interlaced."""
    bits = _PNG_SAMPLES.get(colour, 4) * depth
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
        if columns > 0 and rows > 0:
            total += rows * (1 + -(-columns * bits // 8))
    return total


def _png_chunks(data: bytes, name: str) -> tuple[bytes, list[memoryview]]:
    """The IHDR body and the IDAT bodies, every chunk's CRC checked."""
    view, pos, header, idat = memoryview(data), 8, b"", []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            break  # a truncated chunk: the decoder says "truncated"
        if zlib.crc32(view[pos + 4:end]) != struct.unpack(">I", data[end:end + 4])[0]:
            raise ImageError(f"{name}: the PNG chunk {kind.decode('latin-1')!r} at byte {pos:,} fails its CRC check: "
                             "the file was changed or damaged after it was written; export it again")
        if kind == b"IHDR":
            header = bytes(view[pos + 8:end])
        elif kind == b"IDAT":
            idat.append(view[pos + 8:end])
        elif kind == b"IEND":
            break
        pos = end + 4
    return header, idat


def _inflated_size(idat: list[memoryview], limit: int, deadline: Deadline,
                   decompressobj=_decompressobj) -> tuple[int, bool]:
    """Bytes the IDAT stream inflates to (counted up to ``limit`` + 1) and whether it ended.

    Each chunk is inflated whole, its output capped at what is left of ``limit`` + 1 (so a small
    chunk that inflates to gigabytes stops there) and dropped at once; capping each call at 1 MiB
    instead, and carrying the unconsumed input over, made this pass 1.6x slower.
    """
    inflater, got = decompressobj(), 0
    for piece in idat:
        got += len(inflater.decompress(piece, limit + 1 - got))
        deadline.check("checking the PNG's compressed rows")
        if inflater.eof or got > limit:
            break
    return got, inflater.eof


_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
"""The bit depths the PNG specification allows per colour type."""


def check_png(data: bytes, name: str, deadline: Deadline) -> None:
    """Raise when a PNG's chunks fail their CRC, or its rows inflate to more or fewer bytes than its
    IHDR announces (a changed header invents rows, or drops them)."""
    header, idat = _png_chunks(data, name)
    if len(header) < 13 or not idat:
        return  # no header or no data: the decoder reports it
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth not in _PNG_DEPTHS.get(colour, ()):
        kind = (f"colour type {colour} allows bit depths {'/'.join(map(str, _PNG_DEPTHS[colour]))}" if colour in _PNG_DEPTHS
                else "colour types are 0 (grey), 2 (RGB), 3 (palette), 4 (grey+alpha) and 6 (RGBA)")
        raise ImageError(f"{name}: the PNG header says bit depth {depth} with colour type {colour}, which no PNG has "
                         f"({kind}): the header is damaged or was changed; export the image again")
    expected = _png_raw_bytes(width, height, depth, colour, interlace == 1)
    try:
        got, ended = _inflated_size(idat, expected, deadline)
    except (zlib.error, _InflateError) as exc:
        try:  # damaged: zlib names the damage, in the same words with or without ISA-L
            _inflated_size(idat, expected, deadline, zlib.decompressobj)
        except zlib.error as words:
            exc = words
        raise ImageError(f"{name}: the PNG's compressed rows are damaged ({exc}); export the image again") from None
    if got != expected or not ended:
        rows = got * height // max(expected, 1)
        more = "more" if got > expected else "fewer"
        raise ImageError(f"{name}: the PNG header announces {width}x{height} pixels ({expected:,} bytes of rows) but "
                         f"its data holds {more} ({got:,}{'+' if got > expected else ''} bytes, about {rows:,} rows): "
                         "decoding would invent or drop rows. The header was changed or the file is truncated; "
                         "export the image again")


def _row_bytes(page, width: int) -> int:
    """Bytes of one row ``width`` samples wide of an uncompressed TIFF page's strip or tile: the
    samples of a pixel packed together, or one sample per plane (PlanarConfiguration 2)."""
    samples = page.samplesperpixel if int(page.planarconfig) != 2 else 1
    bits = int(np.max(page.bitspersample)) if np.ndim(page.bitspersample) else int(page.bitspersample)
    return -(-width * samples * bits // 8)


def _tiff_raw_bytes(page) -> int:
    """Bytes an uncompressed TIFF page needs: its rows (or tiles) of packed samples."""
    if page.is_tiled:
        return len(page.dataoffsets) * page.tilelength * _row_bytes(page, page.tilewidth) * page.tiledepth
    planes = 1 if int(page.planarconfig) != 2 else page.samplesperpixel
    return page.imagelength * _row_bytes(page, page.imagewidth) * planes * page.imagedepth


def _full_strips_bytes(page) -> int:
    """Bytes of an uncompressed stripped page whose last strip (of each plane) is padded to a full
    strip, as some writers store it (a valid file: PIL and tifffile read it); for tiles, 0."""
    if page.is_tiled:
        return 0
    rows = min(int(page.rowsperstrip), page.imagelength)
    return len(page.dataoffsets) * rows * _row_bytes(page, page.imagewidth) * page.imagedepth


def tiff_damage(tif, name: str, decoded: Collection[int] | None = None) -> list[int]:
    """Raise when a TIFF page has fewer or more strips/tiles than its size needs, an empty one, or
    (uncompressed) fewer or more bytes of pixel data than its header describes: a changed header;
    or when a page to be decoded (``decoded``, None: every page) ends past the end of the file.
    Returns the other pages that the end of the file cuts (their pixels are lost)."""
    cut, size = [], int(tif.filehandle.size)
    for index in range(min(16, len(tif.pages))):
        page = tif.pages[index].aspage()  # a TiffFrame holds only offsets and counts
        needed, present = int(np.prod(page.chunked)), len(page.dataoffsets)
        counts, offsets = [int(c) for c in page.databytecounts], [int(o) for o in page.dataoffsets]
        raw = _tiff_raw_bytes(page) if int(page.compression) == 1 else None
        ends = [o + c for o, c in zip(offsets, counts)]
        if ends and max(ends) > size and decoded is not None and page.index not in decoded:
            cut.append(page.index)
            continue
        if ends and max(ends) > size:
            last = ends.index(max(ends))
            raise ImageError(f"{name}: the TIFF is truncated: page {page.index}'s strip or tile {last} ends at byte "
                             f"{max(ends):,}, but the file has {size:,} bytes ({max(ends) - size:,} missing), so its "
                             "last rows would be invented; copy or export the file again")
        if needed != present:
            found = f"needs {needed:,} strips or tiles, but the file lists {present:,}"
        elif 0 in counts and offsets[counts.index(0)] == 0:
            block = counts.index(0)
            raise ImageError(f"{name}: TIFF page {page.index} is sparse: strip or tile {block} is absent (offset 0, 0 "
                             "bytes), as GDAL writes empty blocks with SPARSE_OK=TRUE, to be read as zeros. This reader "
                             "does not invent them: rewrite the file dense (gdal_translate -co SPARSE_OK=FALSE in.tif "
                             "out.tif) or read it with GDAL")
        elif 0 in counts:
            found = f"lists an empty strip or tile (number {counts.index(0)})"
        elif 0 in offsets:
            found = f"puts strip or tile {offsets.index(0)} at byte 0, inside the file's header"
        elif raw is not None and not raw <= sum(counts) <= max(raw, _full_strips_bytes(page)) + len(counts):
            found = f"needs {raw:,} bytes of uncompressed pixel data, but its strips or tiles hold {sum(counts):,}"
        else:
            continue
        raise ImageError(f"{name}: TIFF page {page.index} is {page.imagewidth}x{page.imagelength} pixels of "
                         f"{page.bitspersample}-bit samples, which {found}: decoding would invent or drop rows. "
                         "The header was changed or the file is damaged; export it again")
    return cut


def _jpeg_mcu(data: bytes) -> tuple[int, int, int] | None:
    """(MCU height, MCU width, components) from a JPEG's first SOF marker."""
    pos = 2
    while pos + 10 < len(data) and data[pos] == 0xFF:
        if data[pos + 1] in (0xC0, 0xC1, 0xC2):
            components = data[pos + 9]
            factors = [data[pos + 11 + 3 * i] for i in range(components) if pos + 11 + 3 * i < len(data)] or [0x11]
            return 8 * max(f & 0x0F for f in factors), 8 * max(f >> 4 for f in factors), components
        pos += 2 + struct.unpack(">H", data[pos + 2:pos + 4])[0]
    return None


def _jpeg_luma(data: bytes, image: np.ndarray) -> np.ndarray:
    """The Y plane as decoded (before colour conversion, so chroma upsampling does not blur the fill)."""
    if image.ndim == 2:
        return image
    from PIL import Image

    from mlbench.image.formats import bytes_io

    with Image.open(bytes_io(data)) as ycc:
        ycc.draft("YCbCr", ycc.size)
        return np.asarray(ycc)[..., 0]


def _filled_mcus(luma: np.ndarray, mcu_h: int, mcu_w: int) -> tuple[int, int]:
    """How many MCUs at the end of the scan (raster order) are exact mid-grey, and the MCU row where they start."""
    rows, columns = -(-luma.shape[0] // mcu_h), -(-luma.shape[1] // mcu_w)
    grey = np.pad(luma == 128, ((0, rows * mcu_h - luma.shape[0]), (0, columns * mcu_w - luma.shape[1])),
                  constant_values=True)  # the padding of partial MCUs counts as fill: only their pixels decide
    flat = grey.reshape(rows, mcu_h, columns, mcu_w).all(axis=(1, 3)).ravel()  # per MCU, in raster order
    unfilled = np.flatnonzero(~flat)
    if not unfilled.size:
        return flat.size, 0
    last = int(unfilled[-1])  # the last MCU the scan decoded; the fill starts after it
    return flat.size - last - 1, (last // columns + 1) * mcu_h


def _may_end_in_fill(image: np.ndarray) -> bool:
    """False when the last pixel rules out libjpeg's fill, which runs to the end of the scan: its luma
    is then exactly 128. A colour pixel's luma is recomputed from RGB (the conversion keeps it to within
    rounding, whatever chroma upsampling blended in); a clipped channel proves nothing. Only when this
    is True is the luma decoded a second time (it was 55% of reading a colour JPEG)."""
    last = image[-1, -1].astype(np.float64)
    if image.ndim == 2:
        return bool(last == 128)
    luma = 0.299 * last[0] + 0.587 * last[1] + 0.114 * last[2]
    return abs(luma - 128) <= 2 or bool(np.any((last == 0) | (last == 255)))


JPEG_MOST_SCANS = 500
"""The most scans a JPEG may hold: encoders write 1 (baseline) to about 10 (progressive, per component
a few more); each scan of a progressive JPEG passes over the whole image again, so a 329 KB file of
20,000 repeated scans took 40 s to decode (libjpeg-turbo's scan limit guards the same way)."""


def check_jpeg_scans(data: bytes, name: str) -> None:
    """Refuse a JPEG with more than :data:`JPEG_MOST_SCANS` start-of-scan markers before decoding it
    (an ``FF DA`` pair cannot occur inside entropy-coded data, which stuffs every ``FF`` byte)."""
    scans = data.count(b"\xff\xda")
    if scans > JPEG_MOST_SCANS:
        raise ImageError(f"{name}: the JPEG holds {scans:,} scans, where encoders write 1 to about 10 and this reader "
                         f"takes at most {JPEG_MOST_SCANS}: every scan decodes the whole image again, so it would take "
                         "minutes; the file is broken or made to stall decoders. Export the image again")


def jpeg_fill_problems(data: bytes, image: np.ndarray, orientation: int = 1) -> list[Problem]:
    """A problem when the last blocks of the scan are exact mid-grey: what libjpeg writes (silently)
    where the data ends before the rows the header announces."""
    layout = _jpeg_mcu(data)
    if layout is None or layout[2] not in (1, 3) or orientation != 1 or image.ndim > 3:
        return []
    if not _may_end_in_fill(image):
        return []
    luma = _jpeg_luma(data, image)
    columns = -(-luma.shape[1] // layout[1])
    count, start = _filled_mcus(luma, layout[0], layout[1])
    if count < max(1, columns - 1):
        return []
    rows = luma.shape[0]
    return [Problem("jpeg_rows_filled", f"the last {count} of the JPEG's {layout[0]}x{layout[1]} blocks are exact "
                    f"mid-grey (rows {min(start, rows - 1)}..{rows - 1} of {rows}): what libjpeg writes where the data "
                    "ends before the rows the header announces (a changed header or a truncated file). Export the "
                    "image again; if it really ends in a flat grey band, ignore this")]


def gif_frame_problems(data: bytes) -> list[Problem]:
    """A problem when a GIF's first frame does not cover its logical screen (the rest is background)."""
    width, height, flags = struct.unpack("<HHB", data[6:11])
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    while pos < len(data) and data[pos] == 0x21:  # extension blocks: label, then sub-blocks
        pos += 2
        while pos < len(data) and data[pos]:
            pos += data[pos] + 1
        pos += 1
    if pos + 9 > len(data) or data[pos] != 0x2C:
        return []
    left, top, frame_width, frame_height = struct.unpack("<HHHH", data[pos + 1:pos + 9])
    if (left, top, frame_width, frame_height) == (0, 0, width, height):
        return []
    return [Problem("gif_partial_frame", f"the GIF's screen is {width}x{height} but its first frame is "
                    f"{frame_width}x{frame_height} at ({left}, {top}): the rest of the image is background colour, "
                    "not data. The header was changed or the file was written oddly; export the image again")]


def webp_frame_problems(data: bytes) -> list[Problem]:
    """A problem when an animated WebP's first frame (its first ANMF chunk) does not cover the canvas
    its VP8X chunk declares: the decoder fills the rest with the background, not data."""
    canvas, pos = None, 12
    while pos + 8 <= len(data):
        kind, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + min(size, 32)]
        if kind == b"VP8X" and len(body) >= 10:
            canvas = (int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1)
        elif kind == b"ANMF" and len(body) >= 12 and canvas is not None:
            left, top = 2 * int.from_bytes(body[0:3], "little"), 2 * int.from_bytes(body[3:6], "little")
            frame = (int.from_bytes(body[6:9], "little") + 1, int.from_bytes(body[9:12], "little") + 1)
            if (left, top, *frame) == (0, 0, *canvas):
                return []
            return [Problem("webp_partial_frame", f"the WebP's canvas is {canvas[0]}x{canvas[1]} but its first frame "
                            f"is {frame[0]}x{frame[1]} at ({left}, {top}): the rest of the image is background colour, "
                            "not data. Export the frame you need as a still image")]
        pos += 8 + size + (size & 1)  # chunks are padded to an even size
    return []
