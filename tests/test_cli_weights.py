"""``--weights PATH`` and ``--card JSON`` on every command that takes a model (``mlbench/cli_models.py``)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import mlbench as mb
from mlbench.cli import main
from mlbench.cli_models import ModelOptions, read_card, resolve_model_options
from mlbench.studies._sweep import sweep_tasks

CARD = '{"input_size": 128}'


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints of the trained small CBAM-ResUNet with its last bias shifted (so its masks are its own),
    as a training dict, DataParallel (also as other/plain.pth) and safetensors; one that fits nothing;
    two 128 px images."""
    d = tmp_path_factory.mktemp("cli_weights")
    state = {k: v.clone() for k, v in mb.load_model("cbam_resunet").state_dict().items()}
    state["final_conv.4.bias"] += 2.0
    torch.save({"model_state_dict": state, "epoch": 1}, d / "plain.pth")
    torch.save({"module." + k: v for k, v in state.items()}, d / "dp.pth")
    (d / "other").mkdir()
    (d / "other" / "plain.pth").write_bytes((d / "dp.pth").read_bytes())
    save_file(state, str(d / "st.safetensors"))
    torch.save({"head.weight": torch.zeros(3, 3)}, d / "junk.pth")
    (d / "card.json").write_text('{"name": "mine", "input_size": 128}')
    images = d / "images"
    images.mkdir()
    for seed in (0, 1):
        image, _ = mb.make_spheroids((128, 128), 3, np.random.default_rng(seed))
        Image.fromarray((image * 255).astype(np.uint8)).save(images / f"s{seed}.png")
    return d


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_segment_json_carries_the_card_name_and_the_checkpoints_mask(files, capsys):
    image = files / "images" / "s0.png"
    assert main(["segment", str(image), "--weights", str(files / "plain.pth"), "--card", f"@{files / 'card.json'}",
                 "--json"]) == 0
    response = _json(capsys)
    direct = mb.segment(image, mb.load_model(files / "plain.pth", card=mb.ModelCard(input_size=128)))
    bundled = mb.segment(image, mb.load_model("cbam_resunet", card=mb.ModelCard(input_size=128)))
    assert response["model_used"] == "mine" and response["polygons"] == direct.polygons != bundled.polygons
    assert main(["segment", str(image), "--weights", str(files / "plain.pth"), "--card", CARD, "--json"]) == 0
    assert _json(capsys)["model_used"] == "plain"  # the name the checkpoint's card gives: its file's


@pytest.mark.parametrize("name", ["dp.pth", "st.safetensors"])
def test_segment_text_with_dataparallel_and_safetensors(files, capsys, name):
    argv = ["segment", str(files / "images" / "s0.png"), "--weights", str(files / name), "--card", CARD]
    assert main([*argv, "--model", "cbam_resunet"]) == 0
    assert capsys.readouterr().out.startswith(f"Segmentation({name.split('.')[0]}, 128x128")


def test_a_card_alone_overrides_a_bundled_models_fields(files, capsys):
    image = files / "images" / "s0.png"
    assert main(["segment", str(image), "--model", "cbam_resunet", "--card", '{"input_size": 64}', "--json"]) == 0
    direct = mb.segment(image, mb.load_model("cbam_resunet", card=mb.ModelCard(input_size=64)))
    assert _json(capsys)["polygons"] == direct.polygons != mb.segment(image, "cbam_resunet").polygons


def test_memory_estimates_the_checkpoint_at_its_widths(files, capsys):
    assert main(["memory", "--weights", str(files / "plain.pth"), "--sides", "128", "--budgets-gib", "1",
                 "--device", "cpu", "--json"]) == 0
    report = _json(capsys)
    expected = mb.estimate_memory(mb.build_model("cbam_resunet", "small", device="meta"), 128, device="cpu")
    assert report["estimates"][0]["model"] == "plain"
    assert report["estimates"][0]["peak_bytes"] == expected.peak_bytes  # small widths, though --size says full
    assert main(["memory", "cbam_resunet", "--size", "small", "--card", '{"name": "renamed"}', "--sides", "128",
                 "--budgets-gib", "1", "--device", "cpu", "--json"]) == 0
    assert _json(capsys)["estimates"][0] == json.loads(json.dumps({**expected.to_dict(), "model": "renamed"}))


def test_tiles_runs_the_checkpoint(files, capsys):
    assert main(["tiles", str(files / "images" / "s0.png"), "--weights", str(files / "st.safetensors"),
                 "--input-size", "128", "--tiles", "96", "--overlap", "16", "--mode", "image", "--json"]) in (0, 1)
    report = _json(capsys)
    assert report["model"] == "st" and [row["tile"] for row in report["rows"]] == [96]


def test_compare_names_each_checkpoint_apart(files, capsys):
    first, second = str(files / "plain.pth"), str(files / "other" / "plain.pth")
    assert main(["compare", "--samples", "spheroids_8bit", "--weights", first, "--weights", second,
                 "--card", '{"input_size": 64}', "--no-full-size", "--json"]) == 0
    rows = _json(capsys)
    assert [r["model"] for r in rows] == [first, second]  # both named "plain": each is named by its path
    assert rows[0]["pixel_iou"] == rows[1]["pixel_iou"]  # the same tensors, saved two ways


def test_sweep_runs_names_and_checkpoints_side_by_side(files, capsys):
    argv = ["sweep", str(files / "images"), "--models", "cbam_resunet", "--weights", str(files / "plain.pth"),
            "--card", CARD, "--json"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line]
    assert [(r["image"], r["model"], r["status"]) for r in rows] == [
        (image, model, "ok") for image in ("s0.png", "s1.png") for model in ("cbam_resunet", "plain")]
    assert rows[1]["weights_sha"] == mb.card(mb.load_model(files / "plain.pth")).sha256[:16]


def test_sweep_workers_reload_a_checkpoint_with_its_card(files):
    from mlbench.studies.executors import _model

    task = sweep_tasks(files / "images", [mb.load_model(files / "st.safetensors", card=mb.ModelCard(input_size=96))])[0]
    assert (task.model, task.source, task.card) == ("st", str(files / "st.safetensors"), {"input_size": 96})
    assert mb.card(_model(task)).input_size == 96 and mb.card(_model(task)).origin("input_size") == "user"


@pytest.mark.parametrize("argv, code, message", [
    (["segment", "IMG", "--card", "{input_size: 64}"], 2,
     "--card is not JSON (Expecting property name enclosed in double quotes at line 1 column 2"),
    (["segment", "IMG", "--card", '{"input_siz": 64}'], 2, r"--card: ModelCard has no field(s) ['input_siz']"),
    (["segment", "IMG", "--card", "[64]"], 2, "--card is list JSON; expected an object"),
    (["tiles", "IMG", "--card", "@nope.json"], 2, "--card @nope.json: nope.json is not a file"),
    (["segment", "IMG", "--weights", "missing.pth"], 1, "checkpoint 'missing.pth' is not a file"),
    (["memory", "--weights", "DIR/junk.pth"], 1, "junk.pth fits none of the known architectures"),
    (["memory", "hrnet", "--weights", "DIR/plain.pth"], 1, "plain.pth is not a hrnet checkpoint"),
    (["memory"], 2, "`mlbench memory` needs a model: a name (cbam_resunet | hrnet | ma_resunet) or --weights PATH"),
    (["compare", "--models", "cbam_resunet", "resunet_small"], 2, "two models are named ['cbam_resunet']"),
    (["sweep", "DIR/images", "--weights", "DIR/plain.pth", "--weights", "DIR/dp.pth", "--card", '{"name": "x"}'],
     2, "two models are named ['x']"),
    (["compare", "--weights", "DIR/plain.pth", "--weights", "DIR/plain.pth"], 2, "two models are named ['plain.pth']"),
    (["sweep", "DIR/images", "--weights", "DIR/plain.pth", "--untrained"], 2, "with weights='untrained'"),
])
def test_errors_are_one_line_and_an_exit_status(files, capsys, monkeypatch, argv, code, message):
    monkeypatch.chdir(files)
    argv = [a.replace("DIR/", "").replace("IMG", "images/s0.png") for a in argv]
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith(f"mlbench {argv[0]}: ") and message in err and err.count("\n") == 1, err


def test_each_refusal_raises_its_error(files, monkeypatch):
    monkeypatch.chdir(files)
    with pytest.raises(mb.OptionsError, match=r"--card is not JSON \(Expecting value"):
        read_card("input_size=64")
    with pytest.raises(mb.OptionsError, match=r"--card @card\.jsn: card\.jsn is not a file"):
        read_card("@card.jsn")
    with pytest.raises(mb.OptionsError, match=r"--card: ModelCard output='logits' is not one of"):
        read_card('{"output": "logits"}')
    assert read_card("@card.json") == mb.ModelCard(name="mine", input_size=128)
    one = argparse.Namespace(command="memory", model=None, model_default=None, weights=None, card=None,
                             model_options=ModelOptions())
    with pytest.raises(mb.OptionsError, match="`mlbench memory` needs a model"):
        resolve_model_options(one)
    many = argparse.Namespace(command="compare", models=["hrnet", "hrnet"], model_default=None, weights=None,
                              card=None, model_options=ModelOptions(many=True))
    with pytest.raises(mb.OptionsError, match=r"two models are named \['hrnet'\]"):
        resolve_model_options(many)
    with pytest.raises(mb.OptionsError, match="'cbam_resunet' comes from 'no file' with weights='trained'"):
        sweep_tasks(files / "images", [mb.build_model("cbam_resunet", "small")])


def test_help_documents_the_flags(capsys):
    for command in ("segment", "memory", "tiles", "compare", "sweep"):
        with pytest.raises(SystemExit, match="0"):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--weights PATH" in text and "--card JSON" in text and "@file.json" in text
    with pytest.raises(SystemExit, match="0"):
        main(["check-weights", "--help"])
    assert "--card" not in capsys.readouterr().out


def test_your_own_architecture_by_its_factory_on_segment_and_tiles(files, capsys, tmp_path):
    """--model path/file.py:callable builds a user's architecture; --weights loads a checkpoint into it."""
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "class Grey(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)\n"
        "    def forward(self, x):\n"
        "        return self.conv(x)\n"
        "def make():\n"
        "    return Grey()\n")
    torch.manual_seed(0)
    weights = {"conv.weight": torch.full((1, 3, 3, 3), 0.1), "conv.bias": torch.tensor([-0.5])}
    torch.save(weights, tmp_path / "grey.pth")
    image, factory = files / "images" / "s0.png", f"{tmp_path / 'mine.py'}:make"
    assert main(["segment", str(image), "--model", factory, "--weights", str(tmp_path / "grey.pth"),
                 "--card", '{"input_size": 128, "normalization": "x/255"}', "--json"]) == 0
    response = _json(capsys)
    import importlib.util
    spec = importlib.util.spec_from_file_location("mine_direct", tmp_path / "mine.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.make()
    model.load_state_dict(weights)
    direct = mb.segment(image, mb.attach_card(model.eval(), mb.ModelCard(input_size=128, normalization="x/255")))
    assert response["polygons"] == direct.polygons
    assert main(["tiles", str(image), "--model", factory, "--tiles", "64", "--overlap", "8"]) in (0, 1)
    assert "mask IoU" in capsys.readouterr().out
    assert main(["segment", str(image), "--model", f"{tmp_path / 'absent.py'}:make"]) == 2
    assert "absent.py is not a file" in capsys.readouterr().err
