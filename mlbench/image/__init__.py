"""Image files: their bytes and formats, the careful reader, and display images (no matplotlib).

``formats`` sniffs a format and reads header sizes before decoding; ``other_formats`` names a file
that is no accepted image (HEIC, CZI, DICOM, a NumPy array, base64 text) and its conversion; ``decoders`` decode each
format; ``read`` is :func:`read_image` with its :class:`ImageReport`; ``display`` turns images,
masks and labels into uint8 RGB (:func:`overlay`).
"""

from __future__ import annotations

from mlbench.image.display import PALETTE, label_colours, overlay, to_display
from mlbench.image.formats import ImageSource, sniff_format
from mlbench.image.read import DEFAULT_MAX_PIXELS, ImageReport, read_image

__all__ = ["DEFAULT_MAX_PIXELS", "ImageReport", "ImageSource", "PALETTE", "label_colours", "overlay", "read_image", "sniff_format", "to_display"]
