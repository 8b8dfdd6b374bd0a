"""``mb.read_image`` against the plain decoder it wraps, per format, side by side in one run.

Writes one image per format (``--size`` square, default 4096: a synthetic bright-field field of
spheroids with camera noise, tiled) into a temporary folder, then times ``read_image(path)``
and the decoder that ``read_image`` itself delegates to, reading the same file: tifffile for
TIFF, OpenCV for 16-bit colour PNG (turned BGR to RGB), Pillow (``np.asarray(Image.open(path))``) for the rest. The
two run in turn, the order reversed every repetition; the ratio judged is the median over
repetitions of read_image's time over the decoder's in the same repetition. What read_image adds:
the header and budget checks, the PNG chunk and row checks (its CRCs and one more inflate of
the rows), the value range, bit depth and NaN/Inf checks, and percentiles from a strided sample.

Target: every format within 1.5x of its decoder.

    python bench/read_image.py [--size 4096] [--repeats 7] [--formats png8 tiff16 ...]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402

TARGET = 1.5


def _field(size: int) -> np.ndarray:
    """(size, size) float32 in 0..1: a 1024 px spheroid field tiled, with fresh camera noise everywhere."""
    tile, _ = mb.make_spheroids((1024, 1024), 12, np.random.default_rng(0))
    reps = -(-size // 1024)
    field = np.tile(tile, (reps, reps))[:size, :size]
    noise = np.random.default_rng(1).normal(0.0, 0.01, field.shape).astype(np.float32)
    return np.clip(field + noise, 0.0, 1.0)


def _write(folder: Path, size: int) -> dict[str, tuple[Path, str, Callable[[Path], np.ndarray]]]:
    """name -> (path, decoder name, plain decode of the path) for every format."""
    import cv2
    import tifffile
    from PIL import Image

    field = _field(size)
    grey8, grey16 = (field * 255).astype(np.uint8), (field * 4095).astype(np.uint16) * 16
    rgb8 = np.stack([grey8, grey8 // 2 + 64, 255 - grey8], axis=-1)
    rgb16 = np.stack([grey16, grey16 // 2, 65535 - grey16], axis=-1)

    def pil(path: Path) -> np.ndarray:
        with Image.open(path) as image:
            return np.asarray(image)

    def cv2_rgb(path: Path) -> np.ndarray:  # OpenCV reads colour as BGR
        return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)

    files = {}
    for name, array, suffix in (("png8", grey8, "png"), ("png8_rgb", rgb8, "png"), ("png16", grey16, "png"),
                                ("jpeg", rgb8, "jpg"), ("jpeg_grey", grey8, "jpg"), ("bmp", rgb8, "bmp")):
        path = folder / f"{name}.{suffix}"
        Image.fromarray(array).save(path, quality=90) if array.dtype == np.uint8 else cv2.imwrite(str(path), array)
        files[name] = (path, "Pillow", pil)
    path = folder / "png16_rgb.png"
    cv2.imwrite(str(path), rgb16[..., ::-1])
    files["png16_rgb"] = (path, "OpenCV", cv2_rgb)
    for name, array in (("tiff8", grey8), ("tiff16", grey16), ("tiff16_rgb", rgb16), ("tiff_float", field)):
        path = folder / f"{name}.tif"
        tifffile.imwrite(path, array, photometric="rgb" if array.ndim == 3 else "minisblack")
        files[name] = (path, "tifffile", tifffile.imread)
    return files


def measure(path: Path, plain: Callable[[Path], np.ndarray], repeats: int) -> tuple[float, float, float]:
    """(median ms of read_image, median ms of the decoder, median of paired ratios)."""
    image, _ = mb.read_image(path)
    if not np.array_equal(image, plain(path)):
        raise SystemExit(f"{path.name}: read_image and the plain decoder disagree on the pixels")
    ours, theirs = [], []
    for repeat in range(repeats):
        for who in ((0, 1) if repeat % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            mb.read_image(path) if who == 0 else plain(path)
            (ours if who == 0 else theirs).append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(ours, theirs))
    return statistics.median(ours) * 1000, statistics.median(theirs) * 1000, ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--formats", nargs="+", default=None)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        files = _write(Path(folder), args.size)
        for name in args.formats or list(files):
            path, decoder, plain = files[name]
            ours, theirs, ratio = measure(path, plain, args.repeats)
            rows.append((name, decoder, ours, theirs, ratio, path.stat().st_size))
    print(f"{'format':<11} {'decoder':<9} {'read_image ms':>13} {'decoder ms':>10} {'ratio':>6} {'file MB':>8}")
    for name, decoder, ours, theirs, ratio, size in rows:
        print(f"{name:<11} {decoder:<9} {ours:13.1f} {theirs:10.1f} {ratio:6.2f} {size / 1e6:8.1f}")
    ok = all(row[4] <= TARGET for row in rows)
    print(f"\nread_image over the plain decoder, {args.size}x{args.size}, median of {args.repeats} paired runs "
          f"(target <= {TARGET} for every format): {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
