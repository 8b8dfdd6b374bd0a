"""What a file that is no accepted image is, from its first bytes, and how to make an image of it.

:func:`mlbench.read_image` takes PNG, JPEG, TIFF, BMP, GIF and WebP. Users hand it other files
too: an iPhone's HEIC, a microscope's own format (Zeiss CZI, Nikon ND2, DICOM), a NumPy array,
a zipped folder, base64 text copied out of a JSON request, the model's weights by mistake.
"not a recognised image; first bytes b'\\x00\\x00\\x00\\x18ftyp'" leaves them to decode the bytes;
:func:`identify` names the file and the conversion instead. Only magic numbers at fixed offsets
are read (:data:`HEAD_BYTES` at most): no parsing, nothing decoded.
"""

from __future__ import annotations

import re
from pathlib import PurePath

__all__ = ["HEAD_BYTES", "file_kind", "identify", "identified_name", "identify_by_name"]

HEAD_BYTES = 256
"""How many first bytes :func:`identify` needs (DICOM's marker sits at byte 128)."""

_WEIGHTS = "{}, not an image: was the weights path passed as the image? (mb.check_weights(path) inspects weights)"
_EXPORT_TIFF = "export it as TIFF (Fiji/Bio-Formats opens it) or PNG"
_JPEG_XL = "a JPEG XL image: convert it to PNG (djxl, or the pillow-jxl-plugin package)"
_COMPRESSED = "{}-compressed ({}): decompress it first{} and pass the image inside"
_BASE64 = "base64 text of a {}: decode it first (base64.b64decode(text)) and pass the bytes"

_STARTS: tuple[tuple[bytes, str, str], ...] = (  # (magic number, kind, what to do)
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "jpeg2000",
     "a JPEG 2000 image: convert it to TIFF or PNG (OpenJPEG's opj_decompress, or the glymur package)"),
    (b"\xff\x4f\xff\x51", "jpeg2000", "a JPEG 2000 codestream: convert it to TIFF or PNG (OpenJPEG's opj_decompress)"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "jpegxl", _JPEG_XL),
    (b"\xff\x0a", "jpegxl", _JPEG_XL),
    (b"\x93NUMPY", "npy", "a NumPy array (.npy): load it with np.load(path) and save it as an image "
                          "(tifffile.imwrite('image.tif', array) keeps its dtype)"),
    (b"%PDF", "pdf", "a PDF document: export the page as PNG or TIFF at its full resolution"),
    (b"PK\x03\x04", "zip",
     "a ZIP archive (a zipped folder, an .npz, an Office document): unpack it and pass the image inside"),
    (b"PK\x05\x06", "zip", "an empty ZIP archive: there is no image in it"),
    (b"\x1f\x8b", "gzip", _COMPRESSED.format("gzip", ".gz", " (gunzip)")),
    (b"BZh", "bzip2", _COMPRESSED.format("bzip2", ".bz2", "")),
    (b"\xfd7zXZ\x00", "xz", _COMPRESSED.format("xz", ".xz", "")),
    (b"7z\xbc\xaf\x27\x1c", "7z", "a 7-Zip archive: unpack it and pass the image inside"),
    (b"\x28\xb5\x2f\xfd", "zstd", _COMPRESSED.format("zstd", ".zst", "")),
    (b"ZISRAWFILE", "czi", f"a Zeiss CZI file: {_EXPORT_TIFF}, or read it with the pylibCZIrw package"),
    (b"\xda\xce\xbe\x0a", "nd2", f"a Nikon ND2 file: {_EXPORT_TIFF}, or read it with the nd2 package"),
    (b"\x89HDF\r\n\x1a\n", "hdf5",
     "an HDF5 file (Imaris .ims, an .h5 dataset or Keras weights): read the image dataset with h5py and save it as TIFF"),
    (b"8BPS", "psd", "a Photoshop document: flatten it and export PNG or TIFF"),
    (b"\x76\x2f\x31\x01", "exr", "an OpenEXR image: convert it to a 32-bit float TIFF"),
    (b"SIMPLE  =", "fits", "a FITS file: read it with astropy.io.fits and save the array as TIFF"),
    (b"version https://git-lfs", "lfs_pointer", "a Git LFS pointer, not the image: run git lfs pull in its repository"),
    (b"iVBORw0KGgo", "base64", _BASE64.format("PNG")),
    (b"/9j/", "base64", _BASE64.format("JPEG")),
    (b"SUkqA", "base64", _BASE64.format("TIFF")),
    (b"TU0AK", "base64", _BASE64.format("TIFF")),
    (b"data:image/", "data_url",
     "a data URL: decode the base64 after the comma (base64.b64decode(url.split(',', 1)[1])) and pass the bytes"),
)

_ONNX_PRODUCERS = (b"pytorch", b"onnx", b"tf2onnx", b"skl2onnx")
"""Producer names an ONNX model's header carries after its IR version (field 1, byte 0x08)."""

_ISO_BRANDS: tuple[tuple[frozenset[bytes], str], ...] = (
    (frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}),
     "a HEIC/HEIF photo (the iPhone's default): convert it to JPEG or PNG first (macOS: sips -s format png in.heic "
     "--out out.png; Python: the pillow-heif package)"),
    (frozenset({b"avif", b"avis"}), "an AVIF image: convert it to PNG first (ffmpeg -i in.avif out.png, or the "
                                    "pillow-avif-plugin package)"),
    (frozenset({b"isom", b"iso2", b"mp41", b"mp42", b"avc1", b"M4V ", b"dash", b"3gp4", b"3gp5"}),
     "an MP4 video, not an image: extract a frame (ffmpeg -i in.mp4 -frames:v 1 frame.png)"),
    (frozenset({b"qt  "}), "a QuickTime video, not an image: extract a frame (ffmpeg -i in.mov -frames:v 1 frame.png)"),
)


def file_kind(head: bytes) -> str | None:
    """The kind of file ``head`` starts, by its magic number (``"hdf5"``, ``"npy"``, ``"gzip"``,
    ``"czi"`` ...) or, for ``"onnx"``, a protobuf's first field and its producer's name; None when
    no signature matches. :func:`identify` and the checkpoint reader give their own advice per kind."""
    found = next((kind for magic, kind, _ in _STARTS if head.startswith(magic)), None)
    if found is None and head[:1] == b"\x08" and any(word in head[:64] for word in _ONNX_PRODUCERS):
        return "onnx"
    return found


def identify(head: bytes) -> str | None:
    """What the file starting with ``head`` is and how to convert it, for a file no accepted format
    matched (e.g. "a Zeiss CZI file: export it as TIFF ..."); None when nothing is known of it."""
    if head[128:132] == b"DICM":
        return ("a DICOM file: read its pixels with pydicom (pydicom.dcmread(path).pixel_array) and save them as a "
                "16-bit TIFF")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        found = next((text for brands, text in _ISO_BRANDS if brand in brands), None)
        return found or (f"an ISO media file (brand {brand.decode('latin-1')!r}: a video or a HEIF/AVIF image), not an "
                         "accepted image: convert it to PNG (ffmpeg -i in -frames:v 1 frame.png)")
    if head.startswith(b"PK\x03\x04"):  # a ZIP's first entry names what wrote it
        first = head[30:30 + int.from_bytes(head[26:28], "little")]
        if first.endswith(b"data.pkl"):
            return _WEIGHTS.format("a PyTorch checkpoint (torch.save)")
        if first.endswith(b".npy"):
            return "a NumPy .npz file of arrays: np.load(path)[name] gives one; save it as TIFF (tifffile.imwrite)"
    found = next((text for magic, _, text in _STARTS if head.startswith(magic)), None)
    if found:
        return found
    if file_kind(head) == "onnx":
        return _WEIGHTS.format("an ONNX model")
    netpbm = re.match(rb"P([1-7])\s", head)
    if netpbm:
        return (f"a Netpbm image ({'PBM PGM PPM PBM PGM PPM PAM'.split()[int(netpbm.group(1)) - 1]}): convert it to PNG "
                "(PIL.Image.open(path).save('image.png'))")
    if head[8:10] == b'{"' and 0 < int.from_bytes(head[:8], "little") < 2**32:  # the header's length, then JSON
        return _WEIGHTS.format("a safetensors file (model weights)")
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return ("a Python pickle (a checkpoint saved by an older torch, or a pickled array), not an image: pass the "
                "image file itself")
    if head[:1] == b"<" and b"<svg" in head.lower():
        return "an SVG drawing (vectors, not pixels): render it to PNG first (cairosvg, Inkscape)"
    if len(head) >= 16 and not head.strip(b"\x00"):
        return ("all zero bytes (the first 256 at least): a preallocated file whose copy or download never "
                "finished, or a damaged disk; copy the file again")
    return None


_BY_SUFFIX = {
    ".tga": "a Truevision TGA image (by its name: TGA has no signature to check): convert it to PNG "
            "(PIL.Image.open(path).save('image.png'))",
    ".raw": "raw pixels without a header (by its name): with the width, height and dtype the camera wrote, "
            "np.fromfile(path, dtype).reshape(height, width) reads them; save that as TIFF (tifffile.imwrite)",
}
"""Formats without a magic number, known only by the file's suffix; said only after no signature matched."""


def identify_by_name(name: str) -> str | None:
    """What a file whose bytes matched no signature is, by its suffix (``.tga``, ``.raw``); None otherwise."""
    return _BY_SUFFIX.get(PurePath(name).suffix.lower())


def identified_name(head: bytes) -> str | None:
    """The name :func:`identify` gives the file starting with ``head``, without its advice (e.g.
    "a Zeiss CZI file", "a NumPy array (.npy)"), for a report's format field; None when unknown."""
    text = identify(head)
    if text is None:
        return None
    depth = 0
    for at, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0 and (char == ":" or text.startswith(", not ", at)):
            return text[:at]
    return text
