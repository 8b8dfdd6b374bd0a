"""Options, synthetic data, the careful reader, polygons: the model-free parts of the pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

import mlbench as mb
from mlbench.pipeline.options import make_options
from mlbench.pipeline.polygons import mask_to_polygons
from mlbench.pipeline.preprocess import normalize_tensor, scale_divisor, to_unit_range


def disk(shape, center, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def test_make_spheroids_is_deterministic_and_labelled():
    a, la = mb.make_spheroids((128, 160), 4, np.random.default_rng(7))
    b, lb = mb.make_spheroids((128, 160), 4, np.random.default_rng(7))
    assert a.shape == (128, 160) and a.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert 0.0 <= a.min() and a.max() <= 1.0
    ids = np.unique(la)
    assert ids[0] == 0 and list(ids[1:]) == list(range(1, len(ids)))
    # bodies are darker than the background
    assert a[la > 0].mean() < a[la == 0].mean() - 0.2


def test_make_spheroids_rejects_bad_shape():
    with pytest.raises(mb.OptionsError, match="shape must be"):
        mb.make_spheroids((8, 8), 1, np.random.default_rng(0))


def test_presets_and_unknown_options():
    served = make_options("as_served")
    assert served.decoder == "pil" and served.normalize == "none" and served.sigmoid == "if_outside_unit"
    assert make_options("fixed").normalize is None  # the card says: ImageNet for the bundled models
    assert make_options("fixed").resolved(mb.ModelCard()).normalize == "imagenet"
    with pytest.raises(mb.OptionsError, match="preset='nope' is unknown"):
        make_options("nope")
    with pytest.raises(mb.OptionsError, match=r"unknown option 'tresh' \(tresh=0.3\); did you mean 'threshold'\? valid: "):
        make_options("fixed", tresh=0.3)
    with pytest.raises(mb.OptionsError, match="threshold=1.5 is outside"):
        make_options("fixed", threshold=1.5)


VALID = ("valid: convert_rgb, decoder, detect_holes, device, hierarchy, input_size, interpolation, min_area, "
         "normalize, resize, scaling, sigmoid, threshold, train_mode")


def test_unknown_options_name_the_closest_valid_one_everywhere():
    """make_options, mb.Pipeline and Run.with_options share one check and one message."""
    expected = r"^unknown option 'treshold' \(treshold=0.3\); did you mean 'threshold'\? " + VALID + "$"
    model = mb.build_model("cbam_resunet", "small").eval()
    run = mb.Pipeline(model).start(np.zeros((32, 32), np.uint8))
    for attempt in (lambda: make_options("fixed", treshold=0.3), lambda: mb.Pipeline(model, treshold=0.3),
                    lambda: mb.Pipeline("no-such-model", treshold=0.3), lambda: run.with_options(treshold=0.3)):
        with pytest.raises(mb.OptionsError, match=expected) as caught:
            attempt()
        assert isinstance(caught.value, ValueError)
    with pytest.raises(ValueError, match=r"^unknown option 'colour' \(colour='red'\); " + VALID + "$"):
        run.with_options(colour="red")
    with pytest.raises(mb.OptionsError, match=r"^unknown options 'treshold' \(did you mean 'threshold'\?\), 'colour'; valid: "):
        mb.Pipeline(model, treshold=0.3, colour="red")
    assert run.with_options(threshold=0.3).options.threshold == 0.3


def test_scale_divisor_follows_effective_bit_depth():
    assert scale_divisor(np.array([[0, 200]], np.uint8)) == 255
    assert scale_divisor(np.array([[0, 4095]], np.uint16)) == 4095
    assert scale_divisor(np.array([[0, 60000]], np.uint16)) == 65535
    assert scale_divisor(np.array([[0.0, 0.7]], np.float32)) == 1.0
    assert to_unit_range(np.array([[4095]], np.uint16), "dynamic")[0, 0] == 1.0


def test_normalize_one_channel_fails_like_the_served_refactor():
    with pytest.raises(RuntimeError, match=r"output with shape \[1, 32, 32\] doesn't match the broadcast shape \[3, 32, 32\]"):
        import torch

        normalize_tensor(torch.zeros(1, 32, 32))


def _png_bytes(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG") if mode else Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_read_image_keeps_16_bit_and_reports():
    data = (np.arange(64 * 64).reshape(64, 64) * 11).astype(np.uint16)
    buf = io.BytesIO()
    tifffile.imwrite(buf, data)
    image, report = mb.read_image(buf.getvalue())
    assert image.dtype == np.uint16 and np.array_equal(image, data)
    assert report.format == "tiff" and report.bit_depth == 16 and report.ok


def test_read_image_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(mb.ImageError, match="empty.png: the file is empty"):
        mb.read_image(empty)
    html = tmp_path / "page.png"
    html.write_bytes(b"<html><body>502 Bad Gateway</body></html>")
    with pytest.raises(mb.ImageError, match="not a recognised image.*HTML"):
        mb.read_image(html)
    full = _png_bytes(np.zeros((64, 64), np.uint8) + 100)
    with pytest.raises(mb.ImageError, match="truncated|damaged"):
        mb.read_image(full[: len(full) // 2])
    with pytest.raises(mb.ImageError, match="missing.png: does not exist"):
        mb.read_image(tmp_path / "missing.png")


def test_read_image_refuses_huge_header_before_decoding():
    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")
    with pytest.raises(mb.ImageError, match="9,000,000 pixels exceeds the limit of 1,000,000"):
        mb.read_image(buf.getvalue(), max_pixels=1_000_000)


def test_read_image_drops_alpha_and_reports_it():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., :3] = np.arange(32, dtype=np.uint8)[:, None, None]
    rgba[..., 3] = 255
    image, report = mb.read_image(_png_bytes(rgba, "RGBA"))
    assert image.shape == (32, 32, 3)
    assert [p.code for p in report.problems] == ["alpha_dropped"]


def test_polygons_ring_tree_vs_as_served():
    mask = disk((120, 120), (60, 60), 40) & ~disk((120, 120), (60, 60), 15)
    mask |= disk((120, 120), (60, 60), 8)  # an island inside the hole
    tree = mask_to_polygons(mask, hierarchy="tree", min_area=10)
    assert [p["type"] for p in tree] == ["external", "internal", "external"]
    assert tree[1]["parent_id"] == tree[0]["id"] and "parent_id" not in tree[2]
    served = mask_to_polygons(mask, hierarchy="as_served", min_area=10)
    # the island inside the hole has a parent, so the service typed it as a hole
    assert [p["type"] for p in served] == ["external", "internal", "internal"]


def test_polygons_area_filter_and_no_holes():
    mask = disk((100, 100), (30, 30), 20) | disk((100, 100), (80, 80), 3)
    kept = mask_to_polygons(mask, min_area=50)
    assert len(kept) == 1 and kept[0]["vertices_count"] == len(kept[0]["points"])
    ring = disk((100, 100), (50, 50), 40) & ~disk((100, 100), (50, 50), 15)
    assert [p["type"] for p in mask_to_polygons(ring, detect_holes=False)] == ["external"]


def test_describe_survives_arrays_without_numbers():
    from mlbench.pipeline.stages import describe

    assert describe(np.array(["a", None], dtype=object)) == "array(2,) object"
    assert describe(np.array([1.5, -2.0], np.float32)) == "array(2,) float32 range -2..1.5"
