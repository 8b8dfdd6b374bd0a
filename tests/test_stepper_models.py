"""The Stepper with bring-your-own models and images, headless: names, paths and modules; the card;
the model and image path fields; errors in the status line; the busy state; picture sizes."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import mlbench as mb
from mlbench.image.display import to_display
from mlbench.widgets import Stepper
from mlbench.widgets.choices import ModelChoices

torch.set_num_threads(1)


def small_net(name: str = "my_unet", seed: int = 1) -> torch.nn.Module:
    """A small untrained cbam_resunet whose card runs it at 64 px, named ``name``."""
    net = mb.build_model("cbam_resunet", "small", seed=seed).eval()
    return mb.attach_card(net, mb.card(net).changed(input_size=64, name=name))


def save_checkpoint(path, seed: int = 1):
    torch.save({"model_state_dict": mb.build_model("cbam_resunet", "small", seed=seed).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("weights") / "hrnet_best_model.pth")


@pytest.fixture
def counting_loader():
    calls = []

    def load(source):
        calls.append(str(source))
        return mb.load_model(source)
    load.calls = calls
    return load


def png_pixels(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)))


# ---- models: names, paths, modules -------------------------------------------------------------
def test_mapping_of_path_and_module_shows_display_names_and_card(tmp_path, checkpoint, counting_loader):
    net = small_net("candidate_net")
    models = {"production": checkpoint, "candidate": net, "later": tmp_path / "not_yet_written.pth"}
    stepper = Stepper(models=models, model_loader=counting_loader, input_size=64)
    assert stepper.model_select.options == ("production", "candidate", "later") and stepper.model_select.value == "production"
    assert counting_loader.calls == [str(checkpoint)]
    assert stepper.model_card.source == str(checkpoint) and stepper.model_card.architecture == "cbam_resunet"
    assert str(checkpoint) in stepper.card_view.value and "ModelCard" in stepper.card_view.value
    stepper.run_all_button.click()
    assert stepper.run.done and stepper.run.output("forward").shape == (1, 1, 64, 64)
    stepper.model_select.value = "candidate"
    assert stepper.model is net and stepper.run.pipeline.model is net and stepper.run.done
    assert 'data-model="candidate_net"' in stepper.card_view.value
    stepper.model_select.value = "production"
    assert counting_loader.calls == [str(checkpoint)]  # loaded once, cached
    assert stepper.summary().startswith("Stepper(model=production, image=spheroids_8bit")


def test_default_names_never_borrow_a_bundled_name(tmp_path, checkpoint):
    hrnet_file = save_checkpoint(tmp_path / "hrnet.pth")
    untrained = mb.build_model("cbam_resunet", "small").eval()  # its card says cbam_resunet, but not the weights
    stepper = Stepper(untrained, models=[checkpoint, small_net(), str(hrnet_file), untrained, "hrnet"], input_size=64)
    assert stepper.model_select.options == ("hrnet_best_model", "my_unet", "hrnet (checkpoint)",
                                            "cbam_resunet (module)", "hrnet")
    assert stepper.model_select.value == "cbam_resunet (module)"
    assert stepper.choices.add(small_net()) == "my_unet (2)" and stepper.choices.add(checkpoint) == "hrnet_best_model"
    bundled = mb.load_model("ma_resunet")
    tour = Stepper(bundled, input_size=64)  # the bundled model itself keeps its name, no second entry
    assert tour.model_select.options == tuple(mb.list_models()) and tour.model_select.value == "ma_resunet"
    assert tour.model is bundled


def test_add_model_from_the_path_field(checkpoint):
    stepper = Stepper(small_net(), input_size=64)
    stepper.next()
    stepper.model_path.value = f"  {checkpoint}  "
    stepper.add_model_button.click()
    assert stepper.model_select.value == "hrnet_best_model" and "hrnet_best_model" in stepper.model_select.options
    assert stepper.notice == "" and "mlbench-status-ready" in stepper.status.value
    assert stepper.model_card.source == str(checkpoint) and stepper.stage == "decode"
    assert stepper.add_model(small_net("second"), name="B") == "B" and stepper.model_select.value == "B"


def test_bad_model_paths_are_said_in_the_status_not_raised(tmp_path):
    stepper = Stepper(small_net(), input_size=64)
    options = stepper.model_select.options
    stepper.model_path.value = str(tmp_path / "missing.pth")
    stepper.add_model_button.click()
    assert "is not a file" in stepper.notice and "missing.pth" in stepper.status.value
    assert "mlbench-status-error" in stepper.status.value
    assert stepper.model_select.options == options and stepper.model_select.value == "my_unet"
    unfit = tmp_path / "unfit.pth"
    torch.save({"model_state_dict": {"head.weight": torch.zeros(3, 3)}}, unfit)
    assert stepper.add_model(str(unfit)) is None and "WeightsError" in stepper.notice
    stepper.model_path.value = ""
    stepper.add_model_button.click()
    assert "no model given" in stepper.status.value
    stepper.run_all_button.click()  # still usable
    assert stepper.run.done and stepper.notice == "" and not stepper.reset_button.disabled


def test_a_missing_checkpoint_entry_shows_its_error_when_selected(tmp_path):
    stepper = Stepper(models={"production": tmp_path / "gone.pth"}, input_size=64)
    assert stepper.run is None and stepper.model is None and stepper.card_view.value == ""
    assert "WeightsError" in stepper.status.value and "gone.pth" in stepper.status.value
    assert "no run: WeightsError: checkpoint" in stepper.summary()
    assert stepper.next_button.disabled and not stepper.add_model_button.disabled


def test_model_entries_of_the_wrong_kind_are_refused():
    with pytest.raises(mb.OptionsError, match="a model must be a bundled name, a checkpoint path"):
        Stepper(models=[3])
    with pytest.raises(mb.OptionsError, match="display name must be a non-empty string"):
        ModelChoices(mb.load_model).add(small_net(), name="")


# ---- images --------------------------------------------------------------------------------------
def test_open_image_from_the_path_field(tmp_path):
    image = np.full((40, 56), 30, np.uint8)
    image[10:30, 10:30] = 220
    Image.fromarray(image).save(tmp_path / "plate.png")
    stepper = Stepper(small_net(), input_size=64)
    stepper.image_path.value = str(tmp_path / "plate.png")
    stepper.open_image_button.click()
    assert stepper.image_select.value == "file: plate.png" and stepper.run.source == str(tmp_path / "plate.png")
    stepper.run_all()
    assert stepper.result.mask.shape == (40, 56)
    assert stepper.open_image("spheroids_rgb") == "spheroids_rgb" and stepper.result.mask.shape == (480, 640)
    assert stepper.open_image(str(tmp_path / "nope.png")) is None and "is not a file" in stepper.status.value
    assert stepper.image_select.value == "spheroids_rgb"


# ---- busy state ----------------------------------------------------------------------------------
class Watched(torch.nn.Module):
    """Records what the Stepper's controls and status show while its forward runs."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.conv, self.fail, self.seen, self.stepper = torch.nn.Conv2d(3, 1, 1), fail, [], None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stepper
        self.seen.append(([b.disabled for b in s.buttons], s.model_select.disabled, s.status.value))
        if self.fail:
            raise RuntimeError("out of memory (simulated)")
        return self.conv(x)


@pytest.mark.parametrize("fail", [False, True])
def test_controls_are_disabled_while_a_stage_runs_and_enabled_after(fail):
    net = Watched(fail)
    stepper = Stepper(mb.attach_card(net, mb.ModelCard(name="watched", input_size=32)), input_size=32)
    net.stepper = stepper
    stepper.next(), stepper.next()
    stepper.next_button.click()
    buttons, select, status = net.seen[0]
    assert all(buttons) and select and "running forward (watched)" in status and "mlbench-status-busy" in status
    assert not stepper.model_select.disabled and not stepper.back_button.disabled and not stepper.reset_button.disabled
    assert stepper.next_button.disabled is fail
    assert ("forward failed: RuntimeError: out of memory" in stepper.status.value) is fail


def test_controls_come_back_when_an_action_raises():
    stepper = Stepper(small_net(), input_size=64)
    with pytest.raises(RuntimeError, match="boom"):
        with stepper._busy("testing"):
            assert stepper.next_button.disabled and stepper.size_toggle.disabled
            raise RuntimeError("boom")
    assert not stepper.next_button.disabled and not stepper.size_toggle.disabled


# ---- pictures ------------------------------------------------------------------------------------
def test_as_served_16bit_decode_is_drawn_white():
    stepper = Stepper(small_net(), "spheroids_16bit", preset="as_served", input_size=64)
    stepper.next()
    assert "values 255..255" in stepper.view.text
    assert (png_pixels(stepper.view.image("image").png) == 255).all()
    stepper.next()
    assert (png_pixels(stepper.view.image("channel0").png) == 255).all()  # preprocessed: 1.0 everywhere
    assert (to_display(np.zeros((4, 4), np.uint16)) == 0).all() and (to_display(np.full((4, 4), 65535, np.uint16)) == 255).all()
    assert (to_display(np.full((2, 2), 1000, np.uint16)) == 4).all()


def test_size_toggle_draws_pictures_larger():
    stepper = Stepper(small_net(), "spheroids_8bit", input_size=64)
    stepper.run_all()
    stepper.back()
    assert Image.open(io.BytesIO(stepper.view.image("overlay").png)).size == (384, 384)
    stepper.size_toggle.index = 2  # full size
    assert stepper.size_toggle.label == "full size"
    assert Image.open(io.BytesIO(stepper.view.image("overlay").png)).size == (512, 512)
    assert bytes(stepper.images.children[0].children[0].value) == stepper.view.image("overlay").png
    stepper.size_toggle.value = 768
    assert Image.open(io.BytesIO(stepper.view.image("overlay").png)).size == (512, 512)
