"""The real service's own code as the contract: golden forwards, as-served polygons, checkpoints.

``tests/data/reference/golden`` holds outputs of the service's own full-size model classes for
weights and inputs defined by a rule (``golden/README.md``), and of its own ``predict()`` on a
crafted logit map. The full-size models must reproduce them within the stated tolerance (they
reproduce them bit for bit on this machine), and a small checkpoint saved in the service's
training-dict format must be one the service's own loader rebuilds.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mlbench as mb
from mlbench.models import CbamConfig, MaConfig

GOLDEN = Path(__file__).resolve().parent / "data" / "reference" / "golden"
NAMES = ["cbam_resunet", "hrnet", "ma_resunet"]


def rule_tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The golden README's weight rule: seeded by the key's CRC-32, scaled by the key's leaf."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())), dtype=torch.float32)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "weight" and len(shape) >= 2:
        return t * math.sqrt(2.0 / math.prod(shape[1:]))
    if leaf == "weight":
        return 1.0 + 0.1 * t
    if leaf == "bias":
        return 0.1 * t
    return 0.02 * t


@pytest.fixture(scope="module")
def rule_models() -> dict[str, torch.nn.Module]:
    models = {}
    for name in NAMES:
        net = mb.build_model(name, "full").eval()
        net.load_state_dict({k: rule_tensor(k, tuple(v.shape)) for k, v in net.state_dict().items()}, strict=True)
        models[name] = net
    return models


def golden_cases() -> list[tuple[str, str]]:
    return [(name, key) for name in NAMES for key in sorted(load_file(str(GOLDEN / f"{name}.golden.safetensors")))]


@pytest.mark.parametrize(("name", "key"), golden_cases())
def test_full_size_forward_reproduces_the_service(name, key, rule_models):
    golden = load_file(str(GOLDEN / f"{name}.golden.safetensors"))[key]
    side = int(key.split("_")[1])
    x = torch.rand((1, 3, side, side), generator=torch.Generator().manual_seed(side))
    with torch.no_grad():
        out = rule_models[name](x)
    assert out.shape == golden.shape  # HRNet: 250 -> 252, the quirk kept
    scale = max(1.0, float(golden.abs().max()))
    assert float((out - golden).abs().max()) <= 1e-3 * scale
    assert float(((out > 0) == (golden > 0)).float().mean()) >= 0.9999


def test_golden_files_cover_the_quirks():
    assert load_file(str(GOLDEN / "hrnet.golden.safetensors"))["output_250"].shape[-2:] == (252, 252)
    assert {k for k in load_file(str(GOLDEN / "ma_resunet.golden.safetensors"))} == {"output_256", "output_320"}


# ----- as-served polygons: the service's predict() on a crafted logit map ------------------------


class MaskLogits(torch.nn.Module):
    """Returns +8 where ``mask`` is set and -8 elsewhere, at the service's 1024 input."""

    def __init__(self, mask: np.ndarray) -> None:
        super().__init__()
        self.logits = torch.from_numpy(np.where(mask > 0, 8.0, -8.0).astype(np.float32))[None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(x.shape[0], 1, *self.logits.shape[-2:])


@pytest.fixture(scope="module")
def golden_polygons():
    mask = np.array(Image.open(GOLDEN / "polygons.mask1024.png"))
    gold = json.loads((GOLDEN / "polygons.as_served.json").read_text())
    size = gold["detect_holes_true"]["image_size"]
    buf = io.BytesIO()
    Image.fromarray(np.full((size["height"], size["width"]), 128, np.uint8)).save(buf, format="PNG")
    return MaskLogits(mask), buf.getvalue(), gold


@pytest.mark.parametrize("holes", [True, False])
def test_as_served_polygons_equal_the_services(holes, golden_polygons):
    model, image, gold = golden_polygons
    seg = mb.segment(image, model, preset="as_served", input_size=1024, detect_holes=holes)
    assert seg.response["polygons"] == gold[f"detect_holes_{str(holes).lower()}"]["polygons"]


def test_fixed_polygons_type_by_depth_in_the_same_fields(golden_polygons):
    model, image, gold = golden_polygons
    served = gold["detect_holes_true"]["polygons"]
    fixed = mb.segment(image, model, input_size=1024).response["polygons"]
    assert [p["points"] for p in fixed] == [p["points"] for p in served]
    assert [set(p) - {"parent_id"} for p in fixed] == [set(p) - {"parent_id"} for p in served]
    by_id = {p["id"]: p for p in fixed}
    # polygon_9 is an island inside polygon_8's hole: the service typed it internal, fixed does not
    assert [by_id[i]["type"] for i in ("polygon_7", "polygon_8", "polygon_9", "polygon_10")] == \
        ["external", "internal", "external", "internal"]
    assert "parent_id" not in by_id["polygon_9"] and by_id["polygon_10"]["parent_id"] == "polygon_9"
    assert all(by_id[p["parent_id"]]["type"] == "external" for p in fixed if p["type"] == "internal")


def test_as_served_parents_survive_dropped_contours_before_them():
    mask = np.zeros((120, 120), np.uint8)
    mask[112:115, 112:115] = 1  # contour 0 in OpenCV's order: dropped by the 50 px area filter
    mask[40:110, 40:110] = 1
    mask[50:100, 50:100] = 0
    mask[60:90, 60:90] = 1  # an island in the hole: typed internal, its parent the hole
    polygons = mb.mask_to_polygons(mask, hierarchy="as_served", confidence=0.5)
    assert [(p["id"], p["type"], p.get("parent_id")) for p in polygons] == [
        ("polygon_1", "external", None), ("polygon_2", "internal", "polygon_1"), ("polygon_3", "internal", "polygon_2")]
    assert all(type(q["x"]) is float for p in polygons for q in p["points"])


def test_confidence_is_the_sigmoid_of_the_raw_output_even_when_it_was_not_applied():
    class Probabilities(torch.nn.Module):  # an output inside [0, 1]: the service skips the sigmoid...
        def forward(self, x):
            out = torch.full((1, 1, 64, 64), 0.1)
            out[..., 16:48, 16:48] = 0.9
            return out

    seg = mb.segment(np.full((64, 64), 100, np.uint8), Probabilities(), preset="as_served", input_size=64)
    # ...but still takes it for the confidence: sigmoid(0.9), not 0.9
    assert [p["confidence"] for p in seg.response["polygons"]] == [float(torch.sigmoid(torch.tensor(0.9)))]


# ----- checkpoints in the service's format ------------------------------------------------------


def service_detected_widths(name: str, state_dict: dict[str, torch.Tensor]) -> list[int]:
    """What the service's loader reads: the output widths of ``downs.{i}`` / ``encoder{i}.0``."""
    keys = [f"downs.{i}.conv1.weight" for i in range(6)] if name == "cbam_resunet" else \
        [f"encoder{i}.0.conv1.weight" for i in range(1, 6)]
    return [int(state_dict[k].shape[0]) for k in keys if k in state_dict]


def save_training_dict(model: torch.nn.Module, path: Path) -> None:
    """The service's ``weights/<id>_best_model.pth`` layout, ``argparse.Namespace`` included."""
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": {"state": {}, "param_groups": []},
                "scheduler_state_dict": {"last_epoch": 3}, "epoch": 3, "best_iou": 0.91,
                "args": argparse.Namespace(model="x", lr=1e-3, batch_size=4)}, path)


@pytest.mark.parametrize(("name", "service_id", "config_type"),
                         [("cbam_resunet", "resunet_small", CbamConfig), ("ma_resunet", "resunet_advanced", MaConfig)])
def test_small_widths_are_what_the_service_loader_rebuilds(name, service_id, config_type, tmp_path):
    small = mb.build_model(name, "small", seed=3).eval()
    path = tmp_path / f"{service_id}_best_model.pth"
    save_training_dict(small, path)
    # the service builds ResUNetSmall / AdvancedResUNet(features=<detected>): bottleneck twice the last
    rebuilt = mb.build_model(name, widths=config_type.from_widths(service_detected_widths(name, small.state_dict())))
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in small.state_dict().items()}
    loaded = mb.load_model(str(path))
    assert loaded.config == small.config and mb.card(loaded).input_size == 1024
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), small.state_dict().values()))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), small(x))


def test_full_size_service_checkpoint_loads_at_its_widths(tmp_path):
    full = mb.build_model("ma_resunet", "full", seed=1)
    path = tmp_path / "resunet_advanced_best_model.pth"
    save_training_dict(full, path)
    loaded = mb.load_model(path, model="resunet_advanced")
    assert loaded.config == full.config and loaded.mlbench_size == "full"


def test_a_checkpoint_of_the_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "hrnet_best_model.pth"
    save_training_dict(mb.build_model("cbam_resunet", "small"), path)
    with pytest.raises(mb.WeightsError, match=r"hrnet_best_model\.pth is not a hrnet checkpoint.*Best fit: cbam_resunet"):
        mb.load_model(path, model="hrnet")


def test_an_unknown_name_that_is_not_a_file_says_both():
    with pytest.raises(mb.ModelError, match=r"unknown model 'unet'.*not a file either.*does not exist"):
        mb.load_model("unet")
    with pytest.raises(mb.ModelError, match=r"model= and key= apply to checkpoint files"):
        mb.load_model("hrnet", model="hrnet")
