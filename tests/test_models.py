"""Tests of the model zoo: checkpoint layouts, small models, the service's quirks, names, seeds.

Full-size models are only built on the meta device; real forwards use the small widths.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from mlbench.errors import ModelError, WeightsError
from mlbench.models import (
    ALIASES,
    CbamConfig,
    HrnetConfig,
    MaConfig,
    build_model,
    config_from_state_dict,
    list_models,
    model_config,
    resolve_name,
)

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"
"""The service's checkpoint listings, copied from the project's shared reference."""
NAMES = ["cbam_resunet", "hrnet", "ma_resunet"]
FULL_PARAMETERS = {"cbam_resunet": 58_060_957, "hrnet": 65_846_401, "ma_resunet": 19_573_189}
MA_MISMATCH = (
    "The size of tensor a (124) must match the size of tensor b (125) at non-singleton dimension 3"
)
ONE_PIXEL = "Expected more than 1 spatial element when training"


def read_listing(name: str) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """Return the (key, shape) rows and the parameter count of a reference listing."""
    path = REFERENCE / f"{name}.full.state_dict.tsv"
    header, _, *rows = path.read_text().splitlines()
    count = int(re.search(r"(\d+) parameters", header).group(1))
    entries = []
    for row in rows:
        key, shape = row.split("\t")
        entries.append((key, tuple(int(side) for side in shape.split("x"))))
    return entries, count


def layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(key, tuple(value.shape)) for key, value in model.state_dict().items()]


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


@pytest.fixture(scope="module")
def full_models() -> dict[str, nn.Module]:
    return {name: build_model(name, "full", device="meta") for name in NAMES}


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    return {name: build_model(name, "small").eval() for name in NAMES}


def run(model: nn.Module, side: int | tuple[int, int], device: str = "cpu") -> torch.Tensor:
    height, width = (side, side) if isinstance(side, int) else side
    if device == "meta":
        x = torch.empty(1, 3, height, width, device="meta")
    else:
        x = torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(x)


# ----- checkpoint layouts ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_full_state_dict_matches_service_listing(name, full_models):
    entries, count = read_listing(name)
    model = full_models[name]
    assert layout(model) == entries
    assert count_parameters(model) == count == FULL_PARAMETERS[name]
    assert all(parameter.is_meta for parameter in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_small_has_the_full_key_set(name, full_models, small_models):
    assert list(small_models[name].state_dict()) == list(full_models[name].state_dict())
    assert count_parameters(small_models[name]) < FULL_PARAMETERS[name] / 10


@pytest.mark.parametrize("name", NAMES)
def test_every_norm_is_affine_instance_norm(name, small_models):
    norms = [m for m in small_models[name].modules() if "Norm" in type(m).__name__]
    assert norms and all(isinstance(m, nn.InstanceNorm2d) and m.affine for m in norms)
    assert not any(m.track_running_stats for m in norms)


# ----- widths and configs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", ["small", "full"])
def test_config_round_trips_through_state_dict(name, size, full_models, small_models):
    model = full_models[name] if size == "full" else small_models[name]
    config = config_from_state_dict(name, model.state_dict())
    assert config == model.config == model_config(name, size)
    assert model.mlbench_size == size
    rebuilt = build_model(name, widths=config, device="meta")
    assert layout(rebuilt) == layout(model)
    assert rebuilt.mlbench_size == size


def test_full_shapes_identify_as_full(full_models):
    state_dict = full_models["ma_resunet"].state_dict()
    shapes = {key: torch.empty(value.shape, device="meta") for key, value in state_dict.items()}
    assert config_from_state_dict("resunet_advanced", shapes) == model_config("ma_resunet", "full")


@pytest.mark.parametrize(
    ("name", "widths", "expected"),
    [
        ("cbam_resunet", CbamConfig((8, 16, 24, 32, 40), 48), CbamConfig((8, 16, 24, 32, 40), 48)),
        ("cbam_resunet", [8, 16, 24, 32, 40], CbamConfig((8, 16, 24, 32, 40), 80)),
        ("ma_resunet", (8, 16, 24, 32), MaConfig((8, 16, 24, 32), 64, 8)),
        ("hrnet", HrnetConfig(8, 8, (4, 8, 12, 16)), HrnetConfig(8, 8, (4, 8, 12, 16))),
        ("hrnet", (6, 12, 18, 24), HrnetConfig(8, 8, (6, 12, 18, 24))),
    ],
)
def test_custom_widths(name, widths, expected):
    model = build_model(name, widths=widths, device="meta")
    assert model.config == expected
    assert model.mlbench_size == "custom"
    assert config_from_state_dict(name, model.state_dict()) == expected


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: CbamConfig((16, 32, 64), 128), r"widths must be 5 positive int"),
        (lambda: MaConfig((8, 16, 32, 0)), r"widths must be 4 positive int.*0\)"),
        (lambda: MaConfig((8, 16, 32, 64), 100, 8), r"bottleneck \(100\) must be divisible"),
        (lambda: HrnetConfig(16, 16.5, (8, 16, 32, 64)), r"stem and stage1 must be 2 positive"),
        (lambda: build_model("hrnet", widths="wide"), r"must be a HrnetConfig or a sequence"),
        (lambda: build_model("hrnet", widths=CbamConfig()), r"must be a HrnetConfig"),
    ],
)
def test_bad_widths_raise_model_error(make, match):
    with pytest.raises(ModelError, match=match):
        make()


def test_detection_names_the_missing_key_and_the_prefix(small_models):
    wrapped = {f"module.{k}": v for k, v in small_models["cbam_resunet"].state_dict().items()}
    with pytest.raises(WeightsError, match=r"'downs\.0\.conv1\.weight' is missing.*'module\.'"):
        config_from_state_dict("resunet_small", wrapped)


@pytest.mark.parametrize(
    ("name", "multiple", "minimum"),
    [("cbam_resunet", 1, 64), ("hrnet", 4, 33), ("ma_resunet", 16, 32)],
)
def test_model_attributes(name, multiple, minimum, small_models):
    model = small_models[name]
    assert model.mlbench_name == name
    assert (model.input_multiple, model.min_input_size) == (multiple, minimum)


# ----- forwards and the service's quirks ------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_small_forward_gives_one_channel_of_logits(name, small_models):
    model = small_models[name]
    out = run(model, 64)
    assert out.shape == (1, 1, 64, 64)
    head = dict(model.named_children())["last_layer" if name == "hrnet" else "final_conv"]
    assert isinstance(head[-1], nn.Conv2d)  # raw logits: no sigmoid in the model


@pytest.mark.parametrize("name", NAMES)
def test_small_trains_on_a_batch(name):
    model = build_model(name).train()
    out = model(torch.rand(2, 3, 64, 64))
    loss = nn.functional.binary_cross_entropy_with_logits(out, torch.zeros_like(out))
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "relative_position" not in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_hrnet_upsamples_by_scale_factor(small_models):
    assert run(small_models["hrnet"], 250).shape[-2:] == (252, 252)
    assert run(small_models["hrnet"], (64, 98)).shape[-2:] == (64, 100)
    tiny = build_model("hrnet", widths=HrnetConfig(4, 4, (2, 2, 2, 2))).eval()  # same head, cheap
    assert run(tiny, 1024).shape[-2:] == (1024, 1024)


@pytest.mark.parametrize("side", [64, 65, 250])
def test_cbam_guards_keep_the_input_size(side, small_models):
    assert run(small_models["cbam_resunet"], side).shape[-2:] == (side, side)


def test_cbam_guards_keep_1000(full_models):
    assert run(full_models["cbam_resunet"], 1000, "meta").shape[-2:] == (1000, 1000)
    assert run(full_models["cbam_resunet"], (333, 1000), "meta").shape[-2:] == (333, 1000)


def test_ma_resunet_rejects_1000_like_the_service(small_models):
    # 1000 x 1000 fails first on W (dimension 3); 64 x 1000 gives the same message, 16x cheaper.
    with pytest.raises(RuntimeError, match=re.escape(MA_MISMATCH)):
        run(small_models["ma_resunet"], (64, 1000))


def test_ma_resunet_runs_multiples_of_16(small_models, full_models):
    assert run(small_models["ma_resunet"], (32, 80)).shape[-2:] == (32, 80)
    assert run(full_models["ma_resunet"], 1024, "meta").shape[-2:] == (1024, 1024)


@pytest.mark.parametrize(
    ("name", "side"), [("cbam_resunet", 63), ("hrnet", 32), ("ma_resunet", 16)]
)
def test_below_min_input_size_instance_norm_refuses(name, side, small_models):
    model = small_models[name]
    assert side < model.min_input_size
    with pytest.raises(ValueError, match=ONE_PIXEL):
        run(model, side)
    run(model, model.min_input_size)


@pytest.mark.parametrize("size", [(32, 32), (48, 63), (63, 63)])
def test_cbam_refuses_a_one_pixel_bottleneck_like_the_service(size, small_models):
    with pytest.raises(ValueError, match=ONE_PIXEL):
        run(small_models["cbam_resunet"], size)


def test_cbam_runs_a_side_under_64_when_the_other_is_not(small_models):
    assert run(small_models["cbam_resunet"], (63, 100)).shape[-2:] == (63, 100)


def test_bottleneck_attention_is_plain_and_ignores_the_bias_table(small_models, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention must not be used")

    monkeypatch.setattr(nn.functional, "scaled_dot_product_attention", refuse)
    model = small_models["ma_resunet"]
    before = run(model, 32)
    table = model.bottleneck[1].relative_position_bias_table
    assert tuple(table.shape) == (169, 8)
    with torch.no_grad():
        table.add_(1.0)
    try:
        assert torch.equal(run(model, 32), before)
    finally:
        with torch.no_grad():
            table.sub_(1.0)


# ----- the norm --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_norm_is_the_stock_affine_instance_norm(name, small_models):
    norms = [m for m in small_models[name].modules() if "Norm" in type(m).__name__]
    assert norms and all(type(m) is nn.InstanceNorm2d and m.affine and not m.track_running_stats for m in norms)


# ----- names, sizes, seeds -------------------------------------------------------------------


def test_names_and_aliases():
    assert list_models() == ["cbam_resunet", "hrnet", "ma_resunet"]
    assert ALIASES == {"resunet_small": "cbam_resunet", "resunet_advanced": "ma_resunet"}
    assert resolve_name("  ResUNet_Small ") == "cbam_resunet"
    assert resolve_name("RESUNET_ADVANCED") == "ma_resunet"
    assert resolve_name("HRNet") == "hrnet"
    assert build_model("resunet_advanced", device="meta").mlbench_name == "ma_resunet"


@pytest.mark.parametrize("name", ["unet", "", 3])
def test_unknown_name_lists_names_and_aliases(name):
    pattern = r"unknown model .*cbam_resunet.*hrnet.*ma_resunet.*'resunet_small' -> 'cbam_resunet'"
    with pytest.raises(ModelError, match=pattern):
        build_model(name)


def test_bad_size_names_the_argument():
    with pytest.raises(ModelError, match=r"size must be one of \['small', 'full'\], got 'medium'"):
        build_model("hrnet", "medium")


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_deterministic_and_leave_global_rng_alone(name):
    state = torch.get_rng_state()
    first, again = build_model(name, seed=1), build_model(name, seed=1)
    other = build_model(name, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    pairs = zip(first.state_dict().values(), again.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)
    pairs = zip(first.state_dict().values(), other.state_dict().values())
    assert not all(torch.equal(a, b) for a, b in pairs)
