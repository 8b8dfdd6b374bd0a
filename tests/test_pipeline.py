"""The pipeline, the Run, mb.segment, the response schema and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mlbench as mb
from mlbench.cli import main as cli_main

POLYGON_KEYS = {"id", "points", "type", "class", "confidence", "vertices_count"}
RESPONSE_KEYS = {"success", "polygons", "model_used", "threshold_used", "image_size", "processing_time",
                 "inference_time", "preprocessing_time", "device"}


@pytest.fixture(scope="module")
def tiny():
    """An untrained small CBAM-ResUNet run at 64 px: fast, deterministic."""
    model = mb.build_model("cbam_resunet", "small", seed=3).eval()
    return mb.attach_card(model, mb.card(model).changed(input_size=64))


@pytest.fixture(scope="module")
def trained():
    return mb.load_model("cbam_resunet")


def test_run_steps_stage_by_stage(tiny):
    run = mb.Pipeline(tiny).start(mb.load_sample("spheroids_8bit").path)
    assert run.next_stage == "decode"
    record = run.step()
    assert record.name == "decode" and record.status == "done" and record.seconds >= 0
    assert run.output("decode").image.shape == (512, 512)
    with pytest.raises(mb.MlbenchError, match="stage 'forward' is pending"):
        run.output("forward")
    run.run_until("forward")
    assert tuple(run.output("preprocess").shape) == (1, 3, 64, 64)
    assert run.records["postprocess"].status == "pending"
    run.run()
    assert run.done and run.next_stage is None
    with pytest.raises(mb.MlbenchError, match="the run is complete"):
        run.step()


def test_failure_is_recorded_with_stage_and_input(tiny):
    model = mb.build_model("ma_resunet", "small").eval()
    run = mb.Pipeline(model, input_size=1000).start(np.full((40, 40), 128, np.uint8)).run()
    assert run.failed_stage == "forward" and run.records["polygons"].status == "pending"
    assert "tensor(1, 3, 1000, 1000)" in run.records["forward"].input_summary
    message = "The size of tensor a (124) must match the size of tensor b (125) at non-singleton dimension 3"
    assert str(run.error) == message
    with pytest.raises(mb.StageError, match=r"stage 'forward' failed: RuntimeError: The size of tensor a \(124\)") as info:
        run.raise_for_error()
    assert info.value.stage == "forward" and isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("bad, says", [(np.nan, "1 NaN and 0 infinite"), (np.inf, "0 NaN and 1 infinite")])
def test_a_nan_or_inf_pixel_is_refused_before_the_forward(tiny, tmp_path, bad, says):
    """One NaN pixel makes the whole output NaN (the norms spread it) and the mask empty: the careful path refuses the
    image at preprocess, naming the file, the count and the first position; as served, PIL has already clipped it."""
    import tifffile

    image = np.random.default_rng(0).random((72, 64)).astype(np.float32)
    image[7, 5] = bad
    tifffile.imwrite(tmp_path / "export.tif", image)
    with torch.no_grad():
        assert torch.isnan(tiny(torch.from_numpy(np.repeat(image[None, None, :64], 3, 1)))).all()  # what it would do
    run = mb.Pipeline(tiny).start(tmp_path / "export.tif").run()
    assert run.failed_stage == "preprocess" and isinstance(run.error, mb.ImageError)
    assert f"export.tif: {says} value(s) in the image (the first at row 7, column 5)" in str(run.error)
    assert "np.nan_to_num" in str(run.error)
    assert mb.Pipeline(tiny, preset="as_served").start(tmp_path / "export.tif").run().failed_stage is None


class _UsersNet(torch.nn.Module):
    """A user's small network: its own input channels, BatchNorm, and optionally a dict output like torchvision's."""

    def __init__(self, channels: int = 3, as_dict: bool = False) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.body = torch.nn.Sequential(torch.nn.Conv2d(channels, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU(), torch.nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return {"out": self.body(x), "aux": None} if self.as_dict else self.body(x)


def test_a_users_grey_model_gets_grey_input():
    """A model whose first convolution takes one channel: its card says 1 channel (with grey ImageNet statistics),
    the RGB sample is converted and the run says so, where 3 channels crashed the forward."""
    torch.manual_seed(0)
    model = _UsersNet(channels=1).eval()
    card = mb.card(model)
    assert (card.channels, card.mean, card.origin("channels")) == (1, (0.449,), "architecture")
    run = mb.Pipeline(model, input_size=64).start(mb.load_sample("spheroids_rgb").path).run()
    assert run.failed_stage is None and tuple(run.output("preprocess").shape) == (1, 1, 64, 64)
    notes = run.records["preprocess"].notes
    assert any("channel" in note for note in notes), notes


def test_a_model_that_returns_a_dict_is_named_with_the_wrapper_to_write():
    run = mb.Pipeline(_UsersNet(as_dict=True).eval(), input_size=64).start(np.full((64, 64), 9, np.uint8)).run()
    assert run.failed_stage == "forward" and isinstance(run.error, mb.ModelError)
    assert "_UsersNet returned a dict with keys ['out', 'aux'], not one tensor" in str(run.error)
    assert "model(x)['out']" in str(run.error)


@pytest.mark.parametrize("shape, stage, says", [
    ((3, 64, 64), "preprocess", "it looks channel-first (C, H, W); pass np.moveaxis(image, 0, -1), shape (64, 64, 3)"),
    ((1, 64, 64, 3), "preprocess", "it has a batch axis of 1; pass image[0], shape (64, 64, 3)"),
    ((64, 64, 2), "preprocess", "pick one page or channel first"),
    ((0, 64), "decode", "the image array has no pixels (shape (0, 64))"),
])
def test_an_array_in_another_layout_is_named_with_the_reshape(tiny, shape, stage, says):
    """Arrays from other code come channel-first, with a batch axis, or empty: the error gives the call that fixes them."""
    run = mb.Pipeline(tiny).start(np.zeros(shape, np.uint8)).run()
    assert run.failed_stage == stage and says in str(run.error), str(run.error)


def test_an_image_handed_over_as_pil_file_or_tensor_gives_the_paths_mask(tiny):
    """What users hold: a PIL image (palette and CMYK as their colours, 16-bit kept), an open file, a tensor."""
    from PIL import Image

    path = mb.load_sample("spheroids_8bit").path
    reference = mb.segment(path, tiny).mask
    pil = Image.open(path)
    with open(path, "rb") as handle:
        given = [pil, pil.convert("P"), pil.convert("CMYK"), torch.from_numpy(np.array(pil)), handle]
        for image in given:
            assert np.array_equal(mb.segment(image, tiny).mask, reference), type(image).__name__
    deep = mb.load_sample("spheroids_16bit").path
    assert np.array_equal(mb.segment(Image.open(deep), tiny).mask, mb.segment(deep, tiny).mask)
    half = torch.from_numpy(np.array(pil, np.float32) / 255).to(torch.bfloat16)  # NumPy has no bfloat16
    assert mb.Pipeline(tiny).start(half).run().failed_stage is None
    with pytest.raises(mb.OptionsError, match="got list"):
        mb.Pipeline(tiny).start([[0, 1]])
    with open(path, encoding="latin-1") as text, pytest.raises(mb.OptionsError, match="open the image with 'rb'"):
        mb.Pipeline(tiny).start(text)


def test_with_options_reuses_the_forward_pass(tiny):
    run = mb.Pipeline(tiny).start(mb.load_sample("spheroids_8bit").path).run()
    lower = run.with_options(threshold=0.2)
    assert lower.records["forward"] is run.records["forward"]
    assert lower.records["postprocess"].status == "pending"
    lower.run()
    assert lower.output("postprocess").mask.sum() >= run.output("postprocess").mask.sum()
    assert run.options.threshold == 0.5  # the original run is untouched
    redecoded = run.with_options(decoder="pil")
    assert all(r.status == "pending" for r in redecoded.records.values())


def test_as_served_clips_16_bit_while_fixed_keeps_it(tiny):
    path = mb.load_sample("spheroids_16bit").path
    served = mb.Pipeline(tiny, preset="as_served").start(path).run_until("preprocess")
    fixed = mb.Pipeline(tiny).start(path).run_until("preprocess")
    served_image = served.output("decode").image
    assert served_image.dtype == np.uint8 and (served_image == 255).mean() > 0.99
    fixed_image = fixed.output("decode").image
    assert fixed_image.dtype == np.uint16 and fixed_image.max() > 255
    assert float(served.output("preprocess").std()) < 1e-6  # a flat white input
    assert float(fixed.output("preprocess").std()) > 0.3


@pytest.mark.parametrize("preset", ["fixed", "as_served"])
def test_grayscale_works_under_both_presets(tiny, preset):
    seg = mb.segment(mb.load_sample("spheroids_8bit").path, tiny, preset=preset)
    assert seg.mask.shape == (512, 512) and seg.mask.dtype == bool


def test_grayscale_without_rgb_conversion_crashes_like_the_refactor(tiny):
    run = mb.Pipeline(tiny, preset="as_served", convert_rgb=False, normalize="imagenet").start(
        mb.load_sample("spheroids_8bit").path).run()
    assert run.failed_stage == "preprocess"
    assert "output with shape [1, 64, 64] doesn't match the broadcast shape [3, 64, 64]" in str(run.error)


def test_segment_response_schema_and_sizes(trained):
    sample = mb.load_sample("spheroids_rgb")
    seg = mb.segment(sample.path, trained)
    assert seg.mask.shape == (480, 640) and seg.probability.shape == (480, 640)
    assert RESPONSE_KEYS <= set(seg.response)
    assert seg.response["image_size"] == {"width": 640, "height": 480}
    assert seg.response["model_used"] == "cbam_resunet" and seg.response["success"] is True
    assert seg.polygons and all(POLYGON_KEYS <= set(p) for p in seg.polygons)
    assert all(p["type"] in ("external", "internal") for p in seg.polygons)
    json.dumps(seg.response)  # JSON-ready


def test_trained_model_segments_the_8bit_sample_well(trained):
    sample = mb.load_sample("spheroids_8bit")
    seg = mb.segment(sample.path, trained)
    truth = sample.mask > 0
    iou = (seg.mask & truth).sum() / (seg.mask | truth).sum()
    assert iou > 0.85


class ConstantLogits(torch.nn.Module):
    """A model that is sure of nothing: every logit is ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full((x.shape[0], 1, *x.shape[2:]), self.value)


def test_no_polygons_gives_a_warning():
    seg = mb.segment(np.full((64, 64), 200, np.uint8), ConstantLogits(-5.0), input_size=32)
    assert seg.polygons == [] and "No polygons detected" in seg.response["warning"]
    assert seg.response["model_used"] == "ConstantLogits"


def test_served_sigmoid_heuristic_reads_in_range_logits_as_probabilities():
    image = np.full((32, 32), 100, np.uint8)
    served = mb.segment(image, ConstantLogits(0.4), preset="as_served", input_size=32)
    fixed = mb.segment(image, ConstantLogits(0.4), input_size=32)
    assert not served.mask.any() and np.allclose(served.probability, 0.4)
    assert fixed.mask.all() and np.allclose(fixed.probability, 1 / (1 + np.exp(-0.4)))


def test_pipeline_rejects_bad_arguments():
    with pytest.raises(mb.OptionsError, match="model must be a torch.nn.Module or a model name"):
        mb.Pipeline(42)
    with pytest.raises(mb.ModelError, match="unknown model 'unet'"):
        mb.Pipeline("unet")


def test_cli_segment_json(capsys):
    path = mb.load_sample("spheroids_8bit").path
    assert cli_main(["segment", str(path), "--model", "resunet_small", "--json"]) == 0
    response = json.loads(capsys.readouterr().out)
    assert RESPONSE_KEYS <= set(response) and response["model_used"] == "cbam_resunet"


def test_cli_segment_overlay_and_failure(tmp_path, capsys):
    path = mb.load_sample("spheroids_8bit").path
    out = tmp_path / "overlay.png"
    assert cli_main(["segment", str(path), "--model", "ma_resunet", "--preset", "as_served", "--overlay", str(out)]) == 0
    image, _ = mb.read_image(out)
    assert image.shape == (512, 512, 3)
    assert cli_main(["segment", str(path), "--model", "ma_resunet", "--input-size", "1000"]) == 1
    assert "FAILED at stage forward" in capsys.readouterr().out
    assert cli_main(["segment", str(tmp_path / "nope.png")]) == 1


def test_a_stretch_that_squashes_objects_is_noted():
    """The card's stretch to a square is what the service does; beyond a 4-fold change of aspect ratio the run
    says so (a line scan or a strip would otherwise segment silently into garbage)."""
    strip = np.tile(np.linspace(0, 255, 400, dtype=np.float32).astype(np.uint8), (20, 1))
    run = mb.Pipeline("cbam_resunet").start(strip).run_until("preprocess")
    assert "stretching the 20x400 image to 256x256 changes its aspect ratio 20-fold" in str(run)
    photo = np.zeros((300, 400), np.uint8) + 100
    assert "aspect ratio" not in str(mb.Pipeline("cbam_resunet").start(photo).run_until("preprocess"))
    assert "aspect ratio" not in str(mb.Pipeline("cbam_resunet", resize="pad").start(strip).run_until("preprocess"))


def test_the_result_names_what_was_wrong_with_the_input():
    """mb.segment makes a mask of a constant image too: the result's text says the decode found nothing to segment."""
    blank = mb.segment(np.full((64, 64), 200, np.uint8), "cbam_resunet")
    assert [p.code for p in blank.input_problems] == ["constant"]
    assert "\n  input problem [constant] every pixel has the value 200" in str(blank)
    fine = mb.segment(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "cbam_resunet")
    assert fine.input_problems == () and "\n" not in str(fine)
