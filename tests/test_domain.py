"""check_domain: an image outside what the model saw is flagged with its evidence, in-domain ones pass."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import mlbench as mb
from mlbench.checks.domain_stats import domain_reference, layer_distance
from mlbench.paths import data_dir, sha256_file
from mlbench.train import RECIPES, domain_images, main as train_main

SPHEROIDS = [name for name in mb.list_samples() if name.startswith("spheroids")]


@pytest.fixture(scope="module")
def models():
    return {name: mb.load_model(name) for name in mb.list_models()}


@pytest.fixture(scope="module")
def nuclei():
    return mb.load_sample("nuclei_stardist")


class Tiny(nn.Module):
    """A user's own one-channel model with its own layer names, untrained (seeded)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.up = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(8, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.up(self.down(self.stem(x))))


@pytest.fixture(scope="module")
def tiny():
    with torch.random.fork_rng(devices=[]):
        model = Tiny().eval()
    return mb.attach_card(model, mb.ModelCard(name="tiny", channels=1, normalization="x/255", input_size=128))


def _spheroids(seeds) -> list[np.ndarray]:
    return [mb.make_spheroids((256, 256), 7, np.random.default_rng(seed))[0] for seed in seeds]


def test_nuclei_are_outside_what_the_models_saw(models, nuclei):
    for name, model in models.items():
        report = mb.check_domain(nuclei.path, model)
        codes = [p.code for p in report.problems]
        outside = {e.name for e in report.outside}
        assert report.verdict == "outside what this model saw" and not report.ok, name
        assert codes[:3] == ["intensity", "polarity", "object_size"], (name, codes)
        assert {"median", "background", "polarity", "object_radius"} <= outside, (name, outside)
    text = str(mb.check_domain(nuclei.path, models["cbam_resunet"]))
    assert "polarity 1.00 (training -1.00..-1.00)" in text and "problem [activations]" in text
    assert "Retrain or fine-tune on labelled images of this kind" in text


@pytest.mark.parametrize("sample", SPHEROIDS)
def test_every_spheroid_sample_is_in_domain(models, sample):
    for name, model in models.items():
        report = mb.check_domain(mb.load_sample(sample).path, model)
        assert report.ok and report.verdict == "in domain", (name, sample, report.problems)


def test_inverting_the_nuclei_is_still_outside(models, nuclei):
    inverted = nuclei.image.max() - nuclei.image
    report = mb.check_domain(inverted, models["ma_resunet"])
    assert not report.ok and {"p1", "object_radius", "deep (bottleneck)"} <= {e.name for e in report.outside}
    assert "polarity" not in [p.code for p in report.problems]


def test_report_forms(models, nuclei):
    report = mb.check_domain(nuclei.path, models["hrnet"])
    as_dict = report.to_dict()
    assert json.loads(json.dumps(as_dict))["verdict"] == "outside what this model saw" and as_dict["ok"] is False
    assert "<table>" in report._repr_html_() and "OUTSIDE" in repr(report)
    assert report.plot().axes[0].get_title() == "hrnet: outside what this model saw"


def test_a_users_model_with_reference_images(tiny, nuclei):
    reference = domain_reference(tiny, _spheroids(range(300, 312)))
    assert [(layer["role"], layer["module"], layer["at"]) for layer in reference["layers"]] == [
        ("early", "stem", "output"), ("deep", "down", "output"), ("late", "head", "input")]
    assert reference["source"] == "12 reference images"
    for image in _spheroids([400, 401]):
        assert mb.check_domain(image, tiny, reference=reference).ok
    report = mb.check_domain(nuclei.path, tiny, reference=_spheroids(range(300, 312)))
    assert report.verdict == "outside what this model saw" and "polarity" in [p.code for p in report.problems]
    assert report.source == "12 reference images"


def test_without_statistics_it_cannot_judge(tiny, nuclei):
    for model in (tiny, mb.build_model("hrnet").eval()):
        report = mb.check_domain(nuclei.path, model)
        assert report.verdict == "cannot judge" and not report.ok
        assert [p.code for p in report.problems] == ["no_reference"]
        assert "reference=[8 or more images you know are in-domain]" in report.problems[0].message


def test_manifest_domain_entry_is_what_domain_only_computes(tmp_path, capsys):
    weights = data_dir() / "weights"
    shutil.copy(weights / "hrnet.safetensors", tmp_path)
    shutil.copy(weights / "manifest.json", tmp_path)
    before = sha256_file(tmp_path / "hrnet.safetensors")
    threads = torch.get_num_threads()
    try:
        train_main(["--domain-only", "--models", "hrnet", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert sha256_file(tmp_path / "hrnet.safetensors") == before
    bundled = json.loads((weights / "manifest.json").read_text())["models"]
    written = json.loads((tmp_path / "manifest.json").read_text())["models"]
    assert {k: v for k, v in written["hrnet"].items() if k != "domain"} == {k: v for k, v in bundled["hrnet"].items()
                                                                        if k != "domain"}
    _assert_close(written["hrnet"]["domain"], bundled["hrnet"]["domain"])
    assert "hrnet: domain statistics of 32 images" in capsys.readouterr().out


def _assert_close(a, b) -> None:
    """Equal structure and text; numbers equal to the 4 significant digits kept (one unit of the last digit)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_close(x, y)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=2e-3, abs=1e-6)
    else:
        assert a == b


def test_domain_images_are_deterministic():
    first, second = domain_images(RECIPES["hrnet"], n=3), domain_images(RECIPES["hrnet"], n=3)
    assert all(np.array_equal(x, y) for x, y in zip(first, second)) and first[0].shape == (256, 256, 3)


def test_bad_arguments(tiny, nuclei):
    with pytest.raises(mb.OptionsError, match="model must be a torch.nn.Module or a bundled model name, got int"):
        mb.check_domain(nuclei.path, 42)
    with pytest.raises(mb.OptionsError, match=r"reference must be a list of in-domain images .* got str"):
        mb.check_domain(nuclei.path, tiny, reference="a.png")
    with pytest.raises(mb.OptionsError, match="needs at least 2 in-domain images, got 1"):
        mb.check_domain(nuclei.path, tiny, reference=_spheroids([1]))
    with pytest.raises(mb.OptionsError, match=r"reference dict lacks \['confidence', 'image', 'layers'\]"):
        mb.check_domain(nuclei.path, tiny, reference={"source": "mine"})
    with pytest.raises(mb.OptionsError, match="preset='nope' is unknown"):
        mb.check_domain(nuclei.path, tiny, preset="nope")
    foreign = json.loads((data_dir() / "weights" / "manifest.json").read_text())["models"]["hrnet"]["domain"]
    with pytest.raises(mb.OptionsError, match="names layer 'layer1', which Tiny does not have"):
        mb.check_domain(nuclei.path, tiny, reference=foreign)
    with pytest.raises(mb.OptionsError, match="has 3 channels, the reference 64"):
        layer_distance(np.zeros(6), foreign["layers"][0])
