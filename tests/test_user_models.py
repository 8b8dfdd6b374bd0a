"""Users' own models through every entry point: heads the card did not say, dtypes, the meta device,
one input size, a card's multiple and channels, registered names, and the errors each gets."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import mlbench as mb

torch.set_num_threads(1)


class Sigmoided(nn.Module):
    """A model that ends in its own sigmoid: probabilities, not logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.inner(x))


class FixedSize(nn.Module):
    """A model with a Linear layer over the whole 64 x 64 map: it takes that size only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 2, 3, padding=1), nn.Linear(2 * 64 * 64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y.flatten(1)).view(-1, 1, 1, 1) + y[:, :1]


def grey_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 1)).eval()


@pytest.fixture(scope="module")
def image():
    return mb.load_sample("spheroids_8bit").image


def test_a_model_that_outputs_probabilities_is_warned_about_and_has_a_head(image):
    base = mb.load_model("cbam_resunet")
    wrapped = Sigmoided(base).eval()
    with pytest.warns(UserWarning, match=r"output='probability'"):
        doubled = mb.segment(image, mb.attach_card(wrapped, mb.card(base)))
    assert doubled.mask.mean() == 1.0  # what a second sigmoid does, and why the warning says so
    probability = dataclasses.replace(mb.card(base), output="probability")
    right = mb.segment(image, mb.attach_card(Sigmoided(base).eval(), probability))
    assert np.array_equal(right.mask, mb.segment(image, base).mask)
    with pytest.raises(mb.StageError, match="outside \\[0, 1\\]: these are logits"):
        mb.segment(image, mb.attach_card(mb.build_model("cbam_resunet", "small", seed=0).eval(), probability))


def test_half_precision_weights_get_their_dtype_and_meta_weights_a_clear_error(image):
    half = mb.attach_card(grey_model().half(), mb.ModelCard(channels=1, input_size=64, normalization="x/255"))
    result = mb.segment(image, half)
    assert result.mask.shape == image.shape[:2]
    assert "input cast to float16" in " ".join(result.run.records["forward"].notes)
    with pytest.raises(mb.StageError, match="meta device"):
        mb.segment(image, grey_model().to("meta"))
    with pytest.raises(mb.ModelError, match="meta device"):
        mb.predict_tiled(grey_model().to("meta"), torch.rand(1, 1, 128, 128), tile=64, overlap=8)


def test_a_card_that_does_not_say_channels_takes_the_models(image):
    model = mb.attach_card(grey_model(), mb.ModelCard(input_size=64, normalization="x/255"))
    assert mb.card(model).channels == 1 and mb.segment(image, model).mask.shape == image.shape[:2]
    assert mb.estimate_memory(model, 64).peak_bytes > 0  # (1, 1, 64, 64), not 3 channels
    table = mb.compare_models(["spheroids_8bit"], {"grey": model, "cbam": "cbam_resunet"}, full_size=None)
    assert list(table["model"].unique()) == ["grey", "cbam"]


def test_forward_failures_name_their_cause_and_fix(image):
    class NeedsMultiple(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.a(x)
            return self.b(nn.functional.interpolate(nn.functional.max_pool2d(a, 32), scale_factor=32) + a)

    model = mb.attach_card(NeedsMultiple().eval(), mb.ModelCard(input_size=100, input_multiple=32, normalization="x/255"))
    with pytest.raises(mb.StageError, match="not a multiple of 32.*fix: use a side that is a multiple of 32: 96 or 128"):
        mb.segment(image, model)
    assert mb.max_input_size(model, 2e8, device="cpu") % 32 == 0
    fidelity = mb.tile_fidelity(model, torch.rand(1, 3, 200, 232), tiles=[128], overlap=16, norm_stats="tile")
    assert fidelity.table["iou"].between(0, 1).all()  # the whole image is padded to the multiple, as the tiles are
    with pytest.raises(mb.ModelError, match="batch of tiles.*tile at that size"):
        mb.predict_tiled(FixedSize().eval(), torch.rand(1, 3, 200, 232), tile=128, overlap=16)
    with pytest.raises(mb.ModelError, match="bias type.*cast the input to the weights' dtype"):
        mb.predict_tiled(nn.Conv2d(3, 1, 3, padding=1).half().eval(), torch.rand(1, 3, 128, 128), tile=64, overlap=8)
    with pytest.raises(mb.ModelError, match="cannot estimate memory"):
        mb.max_input_size(FixedSize().eval(), 2e8, device="cpu")


def test_scripted_models_and_registered_names_get_what_to_pass_instead():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script's own notice
        scripted = torch.jit.script(grey_model())
    with pytest.raises(mb.OptionsError, match="TorchScript.*plain nn.Module"):
        mb.max_input_size(scripted, 2e8, device="cpu")
    mb.register_model("test_user_models_tiny", grey_model)
    with pytest.raises(mb.ModelError, match=r"you registered.*mb.load_model\(path, model='test_user_models_tiny'\)"):
        mb.Pipeline("test_user_models_tiny")
    with pytest.raises(mb.OptionsError, match="modules or bundled names"):
        mb.compare_models(["spheroids_8bit"], {"bad": 3}, full_size=None)


def test_maps_without_a_channel_axis_get_the_unsqueeze_fix(image):
    class NoChannel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x)[:, 0]

    model = mb.attach_card(NoChannel().eval(), mb.ModelCard(input_size=64, normalization="x/255"))
    with pytest.raises(mb.StageError, match=r"without a channel axis.*unsqueeze\(1\)"):
        mb.segment(image, model)
