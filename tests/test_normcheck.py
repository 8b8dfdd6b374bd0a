"""check_normalization names the normalisation mistake from the model input alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mlbench as mb
from mlbench.checks.normalization import check_normalization, training_reference
from mlbench.pipeline.options import make_options
from mlbench.pipeline.preprocess import normalize_tensor, preprocess_array


@pytest.fixture(scope="module")
def unit_input():
    """A generated spheroid image scaled to [0, 1], three channels, (1, 3, 128, 128), no mean/std."""
    image, _ = mb.make_spheroids((128, 128), 3, np.random.default_rng(42))
    return preprocess_array(image, make_options("fixed", normalize="none", input_size=128))


MISTAKES = {
    "ok": normalize_tensor,
    "no_mean_std": lambda x: x,
    "mean_std_twice": lambda x: normalize_tensor(normalize_tensor(x)),
    "range_0_255": lambda x: x * 255,
    "mean_std_on_0_255": lambda x: normalize_tensor(x * 255),
    "channel_swap": lambda x: normalize_tensor(x).flip(1),
    "scaled_twice": lambda x: normalize_tensor(x / 255),
    "uint8_wraparound": lambda x: _uint8_mean_subtracted(x),
}


def _uint8_mean_subtracted(x: torch.Tensor) -> torch.Tensor:
    """(image_uint8 - mean_uint8) / (std * 255) in NumPy uint8 arithmetic, as a buggy loader does it."""
    image = np.round(x[0].numpy() * 255).astype(np.uint8)
    mean = np.round(np.array([0.485, 0.456, 0.406]) * 255).astype(np.uint8)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    return torch.from_numpy((image - mean) / (std * 255)).float()[None]


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_each_mistake_is_named(unit_input, mistake):
    report = check_normalization(MISTAKES[mistake](unit_input))
    assert report.diagnosis == mistake
    assert report.ok == (mistake == "ok")
    if mistake != "ok":
        assert report.problems[0].code == mistake and report.fix != "nothing to fix"


def test_served_input_of_the_8_bit_sample_lacks_mean_std():
    run = mb.Pipeline(mb.build_model("ma_resunet").eval(), preset="as_served", input_size=128).start(
        mb.load_sample("spheroids_8bit").path).run_until("preprocess")
    report = check_normalization(run.output("preprocess"))
    assert report.diagnosis == "no_mean_std"
    assert "scaled to 0..1 but the training mean/std were not applied" in str(report)


def test_constant_saturated_and_nan_inputs(unit_input):
    constant = check_normalization(torch.ones(1, 3, 32, 32))
    assert [p.code for p in constant.problems] == ["no_mean_std", "constant"]  # all ones: a white /255 image
    clipped = normalize_tensor(torch.clamp(unit_input * 3, 0, 1))
    assert "saturated" in [p.code for p in check_normalization(clipped).problems]
    broken = normalize_tensor(unit_input).clone()
    broken[0, 0, 0, 0] = float("nan")
    assert check_normalization(broken).problems[0].code == "nonfinite"


def test_bad_shape_raises():
    with pytest.raises(mb.OptionsError, match=r"expects a model input of shape \(N, 3, H, W\).*got \(1, 64, 64\)"):
        check_normalization(torch.zeros(1, 1, 64, 64))


def test_reference_from_manifest_or_imagenet(tmp_path, monkeypatch):
    monkeypatch.setenv("MLBENCH_DATA", str(tmp_path))
    training_reference.cache_clear()
    assert training_reference("hrnet", n=2, size=64).source == "ImageNet defaults (no manifest entry used)"
    (tmp_path / "weights").mkdir()
    manifest = {"models": {"hrnet": {"normalization": {"scaling": "x", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}}}
    (tmp_path / "weights" / "manifest.json").write_text(json.dumps(manifest))
    ref = training_reference("hrnet", n=2, size=64, seed=1)
    assert ref.source == "manifest entry of hrnet" and ref.mean == (0.5, 0.5, 0.5)
    training_reference.cache_clear()


def test_report_dict_text_and_plot(unit_input):
    from matplotlib.figure import Figure

    report = check_normalization(unit_input * 255)
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["diagnosis"] == "range_0_255" and as_json["channel_max"][0] <= 255
    assert "expected mean" in str(report)
    fig = report.plot()
    assert isinstance(fig, Figure) and [ax.get_title() for ax in fig.axes] == ["model input", "training input"]
    mine = Figure()
    axes = mine.subplots(1, 2)
    assert report.plot(axes=axes) is mine and len(axes[1].patches) == 3  # one step histogram per channel
    with pytest.raises(mb.OptionsError, match=r"NormReport.plot draws 2 panel\(s\) but was given 1 object"):
        report.plot(axes=axes[:1])
