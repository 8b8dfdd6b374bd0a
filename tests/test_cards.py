"""Bring your own: model cards, every recipe and head against a hand computation, checkpoint layouts,
foreign models, and the train-mode guard."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from torch import nn

import mlbench as mb
from mlbench.models.cards import IMAGENET_MEAN, IMAGENET_STD
from mlbench.pipeline.recipe import apply_geometry, normalize_unit, plan_geometry, read_head, to_channels, undo_geometry

UNIT = np.array([[[0.0, 0.5, 1.0], [0.2, 0.4, 0.6]], [[1.0, 1.0, 1.0], [0.1, 0.3, 0.9]]], np.float32)  # (2, 2, 3)


# ----- the card ------------------------------------------------------------------------------------


def test_card_records_who_said_what():
    bundled = mb.card(mb.load_model("hrnet"))
    assert (bundled.input_size, bundled.origin("input_size"), bundled.origin("widths")) == (256, "manifest", "architecture")
    user = mb.ModelCard(normalization="x/255-0.5", channels=1, output="softmax", foreground=[1], input_size=256)
    assert user.origin("channels") == "user" and user.origin("threshold") == "default"
    assert "channels        1" in repr(user) and "(user)" in repr(user) and "<table>" in user._repr_html_()
    assert user.changed("checkpoint", input_size=512).origin("input_size") == "checkpoint"


@pytest.mark.parametrize(("values", "match"), [
    ({"channels": 2}, r"channels=2: expected 1 \(grey\) or 3 \(RGB\)"),
    ({"normalization": "z-score"}, r"normalization='z-score' is not one of"),
    ({"output": "softmax", "classes": 1}, r"needs classes >= 2"),
    ({"output": "softmax", "classes": 3, "foreground": [3]}, r"foreground=\[3\] must name classes in 0..2"),
    ({"channels": 1}, r"one value per channel \(1\)"),
    ({"resize": "crop"}, r"resize='crop' is not one of"),
    ({"threshold": 1.0}, r"threshold=1.0 is outside"),
])
def test_a_card_that_cannot_be_right_is_refused(values, match):
    with pytest.raises(mb.OptionsError, match=match):
        mb.ModelCard(**values)


def test_card_from_json_and_unknown_fields():
    assert mb.ModelCard.from_dict({"input_size": 128}).origin("input_size") == "user"
    with pytest.raises(mb.OptionsError, match=r"ModelCard has no field\(s\) \['inputsize'\]"):
        mb.ModelCard.from_dict({"inputsize": 128})
    with pytest.raises(mb.OptionsError, match="a card must be a mapping"):
        mb.ModelCard.from_dict([("input_size", 128)])
    with pytest.raises(mb.OptionsError, match="mb.card expects an nn.Module"):
        mb.card("hrnet")


# ----- the recipe, by hand ---------------------------------------------------------------------------


def test_each_normalization_against_a_hand_computation():
    card = mb.ModelCard()
    expected_imagenet = (UNIT - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(normalize_unit(UNIT, card, "imagenet"), expected_imagenet, rtol=1e-6)
    np.testing.assert_array_equal(normalize_unit(UNIT, card, "x/255"), UNIT)
    np.testing.assert_allclose(normalize_unit(UNIT, card, "x/255-0.5"), UNIT - 0.5)
    lo, hi = np.percentile(UNIT, [1, 99])
    np.testing.assert_allclose(normalize_unit(UNIT, card, "percentile"), np.clip((UNIT - lo) / (hi - lo), 0, 1), rtol=1e-6)
    import cv2

    plane = np.round(UNIT[..., 0] * 65535).astype(np.uint16)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(plane) / 65535.0
    np.testing.assert_allclose(normalize_unit(UNIT, card, "clahe")[..., 0], clahe, rtol=1e-6)
    np.testing.assert_allclose(normalize_unit(UNIT, mb.ModelCard(normalization=lambda x: x * 2)), UNIT * 2)
    with pytest.raises(mb.OptionsError, match=r"callable returned shape \(2, 2\)"):
        normalize_unit(UNIT, mb.ModelCard(normalization=lambda x: x[..., 0]))


def test_channels_follow_the_card_and_say_so():
    grey, note = to_channels(UNIT, 1)
    np.testing.assert_allclose(grey[..., 0], UNIT @ np.array([0.299, 0.587, 0.114], np.float32), rtol=1e-6)
    assert "turned grey" in note
    rgb, note = to_channels(UNIT[..., 0], 3)
    assert rgb.shape == (2, 2, 3) and "replicated" in note
    assert to_channels(UNIT, 3)[1] == ""


@pytest.mark.parametrize(("resize", "content", "input_hw", "offset"), [
    ("stretch", (64, 64), (64, 64), (0, 0)),
    ("letterbox", (48, 64), (64, 64), (8, 0)),
    ("pad", (30, 40), (32, 48), (0, 0)),
    ("none", (30, 40), (30, 40), (0, 0)),
])
def test_geometry_and_its_inverse(resize, content, input_hw, offset):
    geometry = plan_geometry((30, 40), resize, 64, 16)
    assert (geometry.content_hw, geometry.input_hw, geometry.offset) == (content, input_hw, offset)
    ramp = np.tile(np.linspace(0, 1, 40, dtype=np.float32), (30, 1))
    placed = apply_geometry(ramp, geometry, "bilinear")
    assert placed.shape == input_hw
    back = undo_geometry(placed, geometry)
    assert back.shape == (30, 40) and np.abs(back - ramp).max() < 0.05  # round trip through resampling


def test_downscale_only_above_the_side():
    assert plan_geometry((300, 400), "downscale", 256, 32, max_side=200).content_hw == (150, 200)
    assert plan_geometry((100, 120), "downscale", 256, 32, max_side=200).input_hw == (128, 128)


# ----- the head, by hand -------------------------------------------------------------------------------


def test_each_head_against_a_hand_computation():
    logits = torch.tensor([[[[2.0, -1.0]], [[0.5, 3.0]], [[-2.0, 0.0]]]])  # (1, 3, 1, 2)
    soft = torch.softmax(logits[0], dim=0)
    softmax = read_head(logits, mb.ModelCard(output="softmax", foreground=[1, 2]))
    np.testing.assert_allclose(softmax.probability, (soft[1] + soft[2]).numpy(), rtol=1e-6)
    argmax = read_head(logits, mb.ModelCard(output="argmax", classes=3, foreground=[1]))
    assert list(argmax.classes.argmax(axis=2)[0]) == [0, 1]
    fg_bg = read_head(logits[:, :2], mb.ModelCard(output="fg_bg"))
    np.testing.assert_allclose(fg_bg.probability, torch.sigmoid(logits[0, 1] - logits[0, 0]).numpy(), rtol=1e-6)
    inside = torch.full((1, 1, 2, 2), 0.3)
    assert read_head(inside, mb.ModelCard(), "if_outside_unit").probability[0, 0] == pytest.approx(0.3)
    assert read_head(inside, mb.ModelCard(), "always").probability[0, 0] == pytest.approx(float(torch.sigmoid(torch.tensor(0.3))))


@pytest.mark.parametrize(("channels", "card", "match"), [
    (2, mb.ModelCard(), r"output has 2 channel\(s\) but its card says output='sigmoid' \(1 channel\(s\)\).*"
                        r"output='softmax', foreground=\[1\]"),
    (1, mb.ModelCard(output="softmax"), r"output has 1 channel\(s\) but its card says output='softmax'"),
    (3, mb.ModelCard(output="softmax", foreground=[4]), r"foreground classes \[4\] but the output has 3 channels"),
])
def test_a_head_that_does_not_fit_its_card_is_an_error(channels, card, match):
    with pytest.raises(mb.ModelError, match=match):
        read_head(torch.zeros(1, channels, 4, 4), card)


# ----- a foreign model: two-class softmax, grey x/255-0.5 input ------------------------------------------


class TwoClassNet(nn.Module):
    """A 'trained' grey two-class model: foreground where the centred input is dark (below -0.2)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[[20.0]]], [[[-20.0]]]]))
            self.conv.bias.copy_(torch.tensor([4.0, -4.0]))

    def forward(self, x):
        return self.conv(x)


TWO_CLASS_CARD = mb.ModelCard(name="candidate", normalization="x/255-0.5", channels=1, output="softmax",
                              foreground=[1], input_size=80)


@pytest.fixture()
def dark_disk():
    image = np.full((80, 80), 220, np.uint8)
    rows, cols = np.ogrid[:80, :80]
    inside = (rows - 40) ** 2 + (cols - 40) ** 2 <= 20**2
    image[inside] = 30
    return np.repeat(image[..., None], 3, axis=2), inside


def test_a_foreign_two_class_model_is_right_under_its_card_and_refused_without(dark_disk, tmp_path):
    image, truth = dark_disk
    net = TwoClassNet().eval()
    recipe_only = mb.ModelCard(normalization="x/255-0.5", channels=1, input_size=64)
    with pytest.raises(mb.StageError, match=r"output has 2 channel\(s\) but its card says output='sigmoid'"):
        mb.segment(image, mb.attach_card(net, recipe_only))  # no head in the card: never channel 0 silently
    torch.save({"state_dict": {f"model.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "last.ckpt")
    loaded = mb.load_model(tmp_path / "last.ckpt", model=TwoClassNet(), card=TWO_CLASS_CARD)
    seg = mb.segment(image, loaded)
    assert seg.response["model_used"] == "candidate"
    assert mb.pixel_scores(truth, seg.mask).iou == 1.0  # no resampling at the model's own size
    run = seg.run
    assert run.records["preprocess"].notes == ("RGB image turned grey (luminance) for the 1-channel model",)
    assert run.output("preprocess").shape == (1, 1, 80, 80)


def test_a_user_module_that_does_not_fit_names_the_keys(tmp_path):
    torch.save(mb.build_model("cbam_resunet", "small").state_dict(), tmp_path / "w.pth")
    with pytest.raises(mb.WeightsError, match=r"does not fit TwoClassNet: 2 missing, 186 unexpected"):
        mb.load_model(tmp_path / "w.pth", model=TwoClassNet())


def test_registered_factory_and_its_card(tmp_path):
    mb.register_model("two_class_test", TwoClassNet, TWO_CLASS_CARD)
    torch.save(TwoClassNet().state_dict(), tmp_path / "w.pt")
    loaded = mb.load_model(tmp_path / "w.pt", model="two_class_test")
    assert isinstance(loaded, TwoClassNet) and mb.card(loaded).output == "softmax"
    assert mb.card(loaded).origin("sha256") == "checkpoint"
    with pytest.raises(mb.OptionsError, match="taken by the bundled architectures"):
        mb.register_model("hrnet", TwoClassNet)


# ----- checkpoint layouts ---------------------------------------------------------------------------------


def _layouts(state: dict) -> dict:
    return {
        "training_dict.pth": {"model_state_dict": state, "epoch": 3, "args": argparse.Namespace(lr=0.1)},
        "data_parallel.pth": {f"module.{k}": v for k, v in state.items()},
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 2,
                           "pytorch-lightning_version": "2.4.0", "hyper_parameters": {"lr": 0.1}},
        "compiled.pt": {f"_orig_mod.{k}": v for k, v in state.items()},
        "plain.pt": state,
    }


def test_every_checkpoint_layout_round_trips_with_identical_tensors(tmp_path):
    from safetensors.torch import save_file

    source = mb.build_model("ma_resunet", "small", seed=5)
    state = source.state_dict()
    for name, obj in _layouts(state).items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "weights.safetensors"))
    for path in sorted(tmp_path.iterdir()):
        loaded = mb.load_model(path)
        assert mb.card(loaded).architecture == "ma_resunet" and mb.card(loaded).source == str(path), path.name
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.values())), path.name


def test_ema_weights_are_chosen_by_key_or_when_alone(tmp_path):
    model_state = mb.build_model("cbam_resunet", "small", seed=1).state_dict()
    ema_state = mb.build_model("cbam_resunet", "small", seed=2).state_dict()
    torch.save({"model": model_state, "ema": ema_state}, tmp_path / "both.pt")
    torch.save({"model_ema": ema_state, "epoch": 9}, tmp_path / "ema_only.pt")
    first = next(iter(model_state))
    assert torch.equal(mb.load_model(tmp_path / "both.pt").state_dict()[first], model_state[first])
    assert torch.equal(mb.load_model(tmp_path / "both.pt", key="ema").state_dict()[first], ema_state[first])
    assert torch.equal(mb.load_model(tmp_path / "ema_only.pt").state_dict()[first], ema_state[first])
    with pytest.raises(mb.WeightsError, match=r"no state dict under 'swa'"):
        mb.load_model(tmp_path / "both.pt", key="swa")


def test_a_checkpoint_that_fits_nothing_asks_for_the_users_module(tmp_path):
    torch.save(TwoClassNet().state_dict(), tmp_path / "mine.pth")
    with pytest.raises(mb.WeightsError, match=r"fits none of the known architectures.*model=MyNet\(\)"):
        mb.load_model(tmp_path / "mine.pth")
    with pytest.raises(mb.WeightsError, match=r"is not a file"):
        mb.load_model(tmp_path / "nothing.pth")


# ----- the train-mode guard -----------------------------------------------------------------------------


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout2d(0.5)
        self.head = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        return self.head(self.drop(self.bn(self.conv(x))))


def test_a_model_in_train_mode_is_named_run_in_eval_and_left_as_it_was():
    net = mb.attach_card(BatchNormNet(), mb.ModelCard(input_size=32))
    image = np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)
    with pytest.warns(mb.errors.MlbenchWarning, match=r"in train mode and 2 module\(s\) compute differently there \(bn, drop\)"):
        pipeline = mb.Pipeline(net)
    first, second = (pipeline.start(image).result().probability for _ in range(2))
    np.testing.assert_array_equal(first, second)  # eval mode: no dropout, running statistics
    assert net.training and net.bn.training  # the caller's flags restored
    with pytest.raises(mb.ModelError, match=r"train mode.*Call model.eval\(\) first"):
        mb.Pipeline(net, train_mode="refuse")
    kept = mb.Pipeline(net, train_mode="keep")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        a = kept.start(image).result().probability
        b = kept.start(image).result().probability
    assert not np.array_equal(a, b)  # train mode reproduced on purpose: dropout differs per run
