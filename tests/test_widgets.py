"""The Stepper and its stage views, headless: set ``.value``, click buttons, read ``.run``/``.result``."""

from __future__ import annotations

import datetime
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

import mlbench as mb
from mlbench.pipeline.run import StageRecord
from mlbench.pipeline.postprocess import Postprocessed
from mlbench.pipeline.stages import STAGE_NAMES, Decoded
from mlbench.metrics import pixel_scores
from mlbench.widgets import Stepper
from mlbench.widgets import views
from mlbench.widgets.html import strip_html, view_html
from mlbench.widgets.images import draw_polygons, heat_map, histogram_image

torch.set_num_threads(1)


class Tiny(torch.nn.Module):
    """A fixed 1x1 convolution: dark pixels (spheroid bodies) give high logits. Counts its forwards."""

    def __init__(self, name: str = "hrnet", fail: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1)
        torch.nn.init.constant_(self.conv.weight, -2.0)
        torch.nn.init.constant_(self.conv.bias, 0.0)
        self.mlbench_name, self.fail, self.calls = name, fail, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail:
            raise RuntimeError("size of tensor a (124) must match the size of tensor b (125)")
        return self.conv(x)


def png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


def disk(shape, center, radius):
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


@pytest.fixture(scope="module")
def models():
    return {}


@pytest.fixture
def stepper(models):
    def loader(name):
        return models.setdefault(name, Tiny(name))
    return Stepper("hrnet", "spheroids_8bit", model_loader=loader, input_size=64)


# ---- pure views ---------------------------------------------------------------------------
def test_decoded_view_reports_dtype_bit_depth_range_and_histogram():
    image = (np.arange(64 * 64).reshape(64, 64) % 4096).astype(np.uint16)
    report = mb.read_image(_tiff_bytes(image))[1]
    view = views.decoded_view(Decoded(image, report))
    assert "dtype uint16" in view.text and "12-bit effective" in view.text and "values 0..4095" in view.text
    assert png_size(view.image("image").png) == (64, 64)
    assert png_size(view.image("histogram").png) == (256, 96)


def _tiff_bytes(image):
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image)
    return buffer.getvalue()


def test_preprocessed_view_has_per_channel_statistics_and_channel_pictures():
    tensor = torch.stack([torch.full((8, 8), v) for v in (0.25, 0.5, 0.75)])[None]
    view = views.preprocessed_view(tensor)
    assert "tensor (1, 3, 8, 8) torch.float32" in view.text
    assert "channel 1: mean 0.500, std 0.000" in view.text
    assert "not mean/std normalised" in view.text
    assert [i.key for i in view.images] == ["channel0", "channel1", "channel2"]


def test_forward_view_logit_range_and_sigmoid_rule():
    logits = torch.tensor([[[[-2.0, 0.0], [1.0, 3.0]]]])
    assert "logits -2..3" in views.forward_view(logits).text
    inside = torch.tensor([[[[0.2, 0.9]]]])
    assert "sigmoid NOT applied" in views.forward_view(inside, "if_outside_unit").text
    assert "NaN" not in views.forward_view(logits).text
    assert "1 non-finite" in views.forward_view(torch.tensor([[[[float("nan"), 1.0]]]])).text
    assert heat_map(np.array([[0.0, 1.0]])).shape == (1, 2, 3)


def test_mask_view_colours_and_iou_against_ground_truth():
    truth = disk((64, 64), (32, 32), 10)
    pred = disk((64, 64), (32, 36), 10)
    post = Postprocessed(pred.astype(np.float32), pred, True, 0.5)
    view = views.mask_view(post, np.zeros((64, 64), np.uint8), truth.astype(np.int32) * 3)
    assert f"pixel IoU {np.count_nonzero(pred & truth) / np.count_nonzero(pred | truth):.3f}" in view.text
    tp = np.count_nonzero(pred & truth)
    assert f"TP {tp}, FP {pred.sum() - tp}, FN {truth.sum() - tp} pixels" in view.text
    assert view.image("overlay") is not None
    shown = np.array(Image.open(io.BytesIO(view.image("overlay").png)))
    assert (shown[32, 44] != shown[0, 0]).any()  # false-positive colour where only pred is
    assert "does not match" in views.mask_view(post, np.zeros((64, 64)), np.zeros((8, 8))).text


def test_polygons_view_counts_draws_and_gives_json():
    mask = np.zeros((64, 64), bool)
    mask[10:40, 10:40] = True
    mask[20:30, 20:30] = False
    polygons = mb.mask_to_polygons(mask, confidence=0.9)
    view = views.polygons_view(polygons, np.zeros((64, 64), np.uint8))
    assert "2 polygon(s): 1 external, 1 internal" in view.text
    assert json.loads(view.details)[0]["type"] == "external"
    drawn = draw_polygons(np.zeros((64, 64), np.uint8), polygons)
    assert drawn[10, 25].any() and not drawn[0, 0].any()
    assert "no polygons" in views.polygons_view([], np.zeros((8, 8))).text


def test_failure_view_and_html_escape():
    error = ValueError("bad <input>")
    view = views.failure_view("forward", error, "tensor(1, 3, 8, 8)")
    assert view.status == "failed" and "ValueError: bad <input>" in view.text and "input: tensor(1, 3, 8, 8)" in view.text
    assert "&lt;input&gt;" in view_html(view)
    assert histogram_image(np.full((4, 4), np.nan)).shape == (96, 256, 3)


# ---- the widget ---------------------------------------------------------------------------
def test_next_walks_every_stage_and_each_view_differs(stepper):
    assert stepper.stage is None and stepper.back_button.disabled and "press Next" in stepper.summary()
    texts = []
    for name in STAGE_NAMES:
        stepper.next_button.click()
        assert stepper.stage == name and stepper.run.records[name].status == "done"
        assert f'data-stage="{name}"' in stepper.view_text.value
        texts.append(stepper.view.text)
    assert len(set(texts)) == len(STAGE_NAMES)
    assert stepper.next_button.disabled and stepper.result is not None
    assert stepper.result.mask.shape == (512, 512)
    assert stepper.images.children and "mlbench-stage-done" in stepper.strip.value


def test_overlay_shows_ground_truth_iou(stepper):
    stepper.run_all_button.click()
    stepper.back_button.click()
    assert stepper.stage == "postprocess"
    assert "pixel IoU" in stepper.view.text
    picture = stepper.images.children[0].children[0]
    assert "mlbench-img-overlay" in picture._dom_classes and bytes(picture.value).startswith(b"\x89PNG")
    iou = pixel_scores(mb.load_sample("spheroids_8bit").mask, stepper.result.mask).iou
    assert f"pixel IoU {iou:.3f}" in stepper.summary()


def test_threshold_reruns_only_postprocess_and_polygons(stepper, models):
    stepper.run_all()
    before = dict(stepper.run.records)
    calls = models["hrnet"].calls
    stepper.threshold_slider.value = 0.8
    after = stepper.run.records
    assert models["hrnet"].calls == calls
    assert all(after[n] is before[n] for n in ("decode", "preprocess", "forward"))
    assert after["postprocess"] is not before["postprocess"] and after["postprocess"].output.threshold == 0.8
    assert stepper.stage == "polygons" and stepper.result.response["threshold_used"] == 0.8


def test_back_reset_and_run_all(stepper):
    stepper.next(), stepper.next()
    stepper.back_button.click()
    assert stepper.stage == "decode" and stepper.run.records["preprocess"].status == "done"
    stepper.reset_button.click()
    assert stepper.stage is None and stepper.run.records["decode"].status == "pending"
    stepper.run_all_button.click()
    assert stepper.run.done and stepper.stage == "polygons"


def test_preset_model_and_image_changes_rerun_to_the_same_stage(stepper, models):
    stepper.run_all()
    stepper.preset_toggle.value = "as_served"
    assert stepper.run.options.normalize == "none" and stepper.run.done and stepper.stage == "polygons"
    stepper.model_select.value = "ma_resunet"
    assert stepper.run.pipeline.model is models["ma_resunet"] and stepper.run.done
    stepper.image_select.value = "spheroids_rgb"
    assert stepper.result.mask.shape == (480, 640)
    assert "image=spheroids_rgb, preset=as_served" in repr(stepper)


def test_failed_stage_shows_exception_stage_and_input():
    stepper = Stepper("ma_resunet", "spheroids_8bit", model_loader=lambda name: Tiny(name, fail=True), input_size=64)
    stepper.run_all_button.click()
    assert stepper.stage == "forward" and stepper.view.status == "failed"
    assert "RuntimeError: size of tensor a (124)" in stepper.view.text
    assert "input: tensor(1, 3, 64, 64)" in stepper.view.text
    assert stepper.next_button.disabled and stepper.result is None
    assert "mlbench-stage-failed" in stepper.strip.value and "traceback" in stepper.view_text.value


def test_missing_weights_are_shown_not_raised():
    def missing(name):
        raise mb.WeightsError(f"weights manifest not found for {name}")

    stepper = Stepper("hrnet", "spheroids_8bit", model_loader=missing)
    assert stepper.run is None and stepper.result is None
    stepper.next_button.click()
    assert "no run: WeightsError: weights manifest not found for hrnet" in stepper.summary()
    assert stepper.next_button.disabled and "mlbench-error" in stepper.view_text.value


def test_upload_and_custom_array_images():
    image = (disk((48, 48), (24, 24), 9) * 200).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    stepper = Stepper(Tiny("cbam_resunet"), "spheroids_8bit", input_size=32)
    stepper.upload.value = ({"name": "disk.png", "type": "image/png", "size": buffer.tell(),
                             "content": memoryview(buffer.getvalue()),
                             "last_modified": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)},)
    assert stepper.image_select.value == "upload: disk.png"
    stepper.run_all()
    assert stepper.result.mask.shape == (48, 48) and "pixel IoU" not in stepper.summary()
    custom = Stepper(Tiny("cbam_resunet"), image, input_size=32)
    custom.run_all()
    assert custom.image_select.value == "<your image>" and custom.result.mask.shape == (48, 48)


def test_real_small_model_runs_through_the_stepper():
    stepper = Stepper("cbam_resunet", "spheroids_16bit", model_loader=lambda n: mb.build_model(n, "small").eval(), input_size=64)
    stepper.run_all()
    assert stepper.run.done and stepper.run.output("forward").shape == (1, 1, 64, 64)
    assert stepper.summary() == repr(stepper) and "\n  result: foreground" in stepper.summary()


def test_strip_marks_current_stage():
    records = {n: StageRecord(n) for n in STAGE_NAMES}
    html = strip_html(records, "forward")
    assert html.count("mlbench-stage-pending") == 5 and html.count("mlbench-current") == 1


def test_display_helpers_shrink_with_known_sizes():
    from mlbench.widgets.images import display, fit, scale_for

    big = np.zeros((768, 1536), np.uint16)
    assert scale_for(big.shape) == 0.25 and fit(big).shape == (192, 384) and fit(big).dtype == np.uint16
    mask = np.zeros((768, 1536), bool)
    mask[:, 768:] = True
    small = fit(mask, nearest=True)
    assert small.dtype == bool and small.shape == (192, 384) and small[:, 192:].all() and not small[:, :192].any()
    assert display(np.zeros((10, 20), np.int64)).shape == (10, 20, 3)
    square = [{"type": "external", "points": [{"x": 400, "y": 400}, {"x": 1200, "y": 400}, {"x": 1200, "y": 700},
                                              {"x": 400, "y": 700}]}]
    drawn = draw_polygons(big, square)
    assert drawn.shape == (192, 384, 3) and drawn[100, 100].any() and not drawn[50, 50].any()

