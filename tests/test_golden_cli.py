"""Golden outputs: ``mlbench golden record | check | bisect`` catch a changed weight, a changed option
and the package version that moved the outputs (a toy package built here, installed from a local folder).

The recorded model is the bundled small HRNet, loaded as a checkpoint file and run at 64 px on one
sample, so each record or check takes about a second.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mlbench as mb
from mlbench.cli import main
from mlbench.errors import DataError, OptionsError
from mlbench.models.loading import weights_path
from mlbench.paths import data_dir
from mlbench.studies.golden import golden_images, load_golden
from mlbench.studies.golden_bisect import golden_bisect
from mlbench.studies.golden_cli import read_card_fields
from mlbench.studies.golden_envs import EnvFailure, ThrowawayEnv, _run, list_versions
from mlbench.studies.golden_identity import ModelSpec, card_fields
from mlbench.studies.golden_report import Tolerance, compare_image

SAMPLE = data_dir() / "samples" / "spheroids_8bit.png"
GOLDEN = "golden/hrnet.safetensors"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: a 64 px HRNet forward is ~0.1 s, where two threads on a busy 2-core machine spin for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Path:
    """A folder with a checkpoint, an image and the golden file recorded from them (paths stored relative)."""
    folder = tmp_path_factory.mktemp("recorded")
    shutil.copy(weights_path("hrnet"), folder / "hrnet.safetensors")
    shutil.copy(SAMPLE, folder / SAMPLE.name)
    code = main(["golden", "record", "--model", "hrnet", "--weights", str(folder / "hrnet.safetensors"),
                 "--card", '{"input_size": 64}', "--images", str(folder / SAMPLE.name), "--out", str(folder / GOLDEN)])
    assert code == 0
    return folder


def test_check_passes_on_the_unchanged_model(recorded, capsys):
    assert main(["golden", "check", str(recorded / GOLDEN)]) == 0
    out = capsys.readouterr().out
    assert "OK: every image within tolerance" in out
    assert "spheroids_8bit.png  same" in out and "environment, model and options: unchanged" in out


def test_check_fails_after_a_weight_changed_and_names_the_model(recorded, tmp_path, capsys):
    copy = shutil.copytree(recorded, tmp_path / "copy")  # the golden file finds its checkpoint relative to itself
    tensors = load_file(str(copy / "hrnet.safetensors"))
    tensors["last_layer.3.bias"] = tensors["last_layer.3.bias"] + np.float16(1.5)
    save_file(tensors, str(copy / "hrnet.safetensors"))
    assert main(["golden", "check", str(copy / GOLDEN), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["moved"] == ["spheroids_8bit.png"]
    image = report["images"][0]
    assert image["input"] == "same" and image["verdict"] == "MOVED"  # the input did not move: the model did
    assert image["max_logit_diff"] == pytest.approx(1.5, abs=0.02)
    assert {"sha256", "state_sha256"} <= set(report["model_diff"])
    assert main(["golden", "check", str(copy / GOLDEN), "--atol", "2", "--min-iou", "0.5"]) == 0  # a looser tolerance


def test_check_detects_a_changed_preprocessing_option(recorded, capsys):
    assert main(["golden", "check", str(recorded / GOLDEN), "--option", "normalize=none"]) == 1
    out = capsys.readouterr().out
    assert "MOVED: 1 of 1 image(s) beyond tolerance" in out
    assert "spheroids_8bit.png  preprocess moved" in out and "options: normalize imagenet -> none" in out
    assert main(["golden", "check", str(recorded / GOLDEN), "--option", "treshold=0.3"]) == 2
    assert "did you mean 'threshold'" in capsys.readouterr().err


def test_check_refuses_when_a_recorded_image_is_gone(recorded, tmp_path):
    copy = shutil.copytree(recorded, tmp_path / "copy")
    (copy / SAMPLE.name).unlink()
    with pytest.raises(DataError, match="'spheroids_8bit.png' of .* is gone: it was recorded at '../spheroids_8bit.png'"):
        mb.golden_check(copy / GOLDEN)


def test_python_api_with_a_model_object(tmp_path):
    net = mb.load_model("hrnet", card=mb.ModelCard(input_size=64))
    golden = mb.golden_record(net, [SAMPLE], tmp_path / "g.safetensors", card={"threshold": 0.4})
    assert isinstance(golden, mb.Golden) and "Golden(hrnet, g.safetensors): 1 image(s)" in repr(golden)
    assert mb.card(net).threshold == 0.5  # the caller's model keeps its own card
    with pytest.raises(OptionsError, match=r"recorded from a model object \(HRNet\) that it cannot build again"):
        mb.golden_check(golden.path)
    with pytest.raises(OptionsError, match="recorded from a model object; bisect rebuilds the model"):
        golden_bisect(golden.path, "numpy", versions=["1.0", "2.0"])
    report = mb.golden_check(golden.path, model=net, card={"threshold": 0.4})
    assert isinstance(report, mb.GoldenReport) and report.ok and report.images[0].verdict == "same"
    assert repr(report).startswith("GoldenReport(hrnet, g.safetensors): OK") and "<table>" in report._repr_html_()


# ----- bisect: a toy package whose function changes at version 2.0 --------------------------------

TOY_MODEL = '''
import torch

import mlbench as mb


class Toy(torch.nn.Module):
    """Brightness in, logits out, through mlb_toy.adjust: the package under test."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(8.0))

    def forward(self, x):
        import mlb_toy

        return mlb_toy.adjust(self.scale * (x.mean(dim=1, keepdim=True) - 0.5))


def make():
    return mb.attach_card(Toy().eval(), mb.ModelCard(name="toy", input_size=32, normalization="x/255"))
'''


def write_wheel(folder: Path, version: str, source: str) -> Path:
    """A pure-Python wheel of ``mlb-toy`` (module ``mlb_toy``) at ``version``, written by hand."""
    dist = f"mlb_toy-{version}"
    files = {"mlb_toy/__init__.py": source,
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: mlb-toy\nVersion: {version}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for name, text in files.items()]
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_bisect_names_the_version_that_moved_the_outputs(tmp_path, monkeypatch, capsys):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for version, offset in (("1.0", 0.0), ("2.0", 2.0), ("3.0", 2.0)):
        write_wheel(wheels, version, f"def adjust(logits):\n    return logits + {offset}\n")
    (tmp_path / "toy_model.py").write_text(TOY_MODEL)
    installed = tmp_path / "site-1.0"  # version 1.0 importable here, as if installed
    zipfile.ZipFile(wheels / "mlb_toy-1.0-py3-none-any.whl").extractall(installed)
    monkeypatch.syspath_prepend(str(installed))
    try:
        golden = mb.golden_record(f"{tmp_path / 'toy_model.py'}:make", [SAMPLE], tmp_path / "toy.safetensors",
                                  packages=["mlb-toy"])
    finally:
        sys.modules.pop("mlb_toy", None)
    assert golden.meta["environment"]["packages"]["mlb-toy"] == "1.0"
    assert golden.meta["model"]["spec"]["model"] == "toy_model.py:make"  # relative to the golden file
    envs = tmp_path / "envs"
    envs.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(envs))
    code = main(["golden", "bisect", str(golden.path), "--package", "mlb-toy", "--from", "1.0", "--to", "3.0",
                 "--versions", "1.0,2.0,2.5,3.0", "--find-links", str(wheels), "--json", "--no-progress"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["found"] and (report["first_moved"], report["last_same"]) == ("2.0", "1.0")
    verdicts = {r["version"]: r["verdict"] for r in report["results"]}
    assert verdicts == {"1.0": "same", "3.0": "moved", "2.5": "error", "2.0": "moved"}  # 2.5 has no wheel: skipped
    assert "installing mlb-toy==2.5 failed" in [r for r in report["results"] if r["version"] == "2.5"][0]["summary"]
    assert list(envs.iterdir()) == []  # every environment removed


# ----- the parts, without a model ---------------------------------------------------------------


def test_compare_image_measures_each_output():
    logits, mask = np.zeros((1, 1, 8, 8), np.float16), np.zeros((10, 10), bool)
    mask[2:6, 2:6] = True
    old = {"status": "ok", "file_sha256": "a", "decoded_sha256": "b", "input_sha256": "c", "n_polygons": 1}
    arrays = {"logits": logits, "mask": mask}
    same = compare_image("x", old, arrays, dict(old), {"logits": logits.copy(), "mask": mask.copy()}, Tolerance())
    assert (same.moved, same.verdict) == (False, "same")
    near = compare_image("x", old, arrays, dict(old), {"logits": logits + np.float16(0.015), "mask": mask}, Tolerance())
    assert (near.moved, near.verdict) == (False, "within tolerance")
    assert near.max_logit_diff == pytest.approx(0.015, abs=1e-3)
    moved = compare_image("x", old, arrays, old | {"input_sha256": "d", "n_polygons": 3},
                          {"logits": logits + np.float16(1), "mask": np.roll(mask, 1, axis=1)}, Tolerance())
    assert moved.moved and moved.input == "preprocess moved" and moved.mask_iou == pytest.approx(12 / 20)
    assert "polygon count 1 -> 3" in moved.reasons and "mask IoU 0.6000 < 0.99" in moved.reasons
    failed = compare_image("x", old, arrays, {"status": "failed", "stage": "decode", "error": "ImageError: bad",
                                              "file_sha256": "a"}, {}, Tolerance())
    assert failed.reasons == ("was ok; now failed at decode: ImageError: bad",) and failed.input == "not compared"


def test_bad_arguments_are_refused_with_the_fix(tmp_path, recorded, monkeypatch):
    with pytest.raises(OptionsError, match="must be finite numbers >= 0 and min_iou within 0..1"):
        Tolerance(atol=-1)
    with pytest.raises(OptionsError, match="min_iou"):
        Tolerance(min_iou=1.5)
    with pytest.raises(OptionsError, match="is neither a file nor a folder"):
        golden_images([tmp_path / "missing.png"])
    with pytest.raises(OptionsError, match="no image found"):
        golden_images(tmp_path)
    assert SAMPLE in golden_images(SAMPLE.parent) and not any(".labels" in p.name for p in golden_images(SAMPLE.parent))
    with pytest.raises(OptionsError, match="at least two versions of 'mlb-toy'"):
        golden_bisect(recorded / GOLDEN, "mlb-toy", versions=["1.0"])
    with pytest.raises(OptionsError, match="installer='conda'"):
        ThrowawayEnv("mlb-toy", "1.0", installer="conda")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(OptionsError, match="uv is not on the PATH"):
        ThrowawayEnv("mlb-toy", "1.0", installer="uv")


def test_golden_files_that_cannot_be_read(tmp_path):
    with pytest.raises(DataError, match="does not exist .* record one first"):
        load_golden(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="is not a readable safetensors file"):
        load_golden(tmp_path / "junk.safetensors")
    save_file({"x": np.zeros(2, np.float32)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(DataError, match="is not a golden file of this mlbench"):
        load_golden(tmp_path / "weights.safetensors")


def test_model_specs_and_cards_that_cannot_be_built(tmp_path):
    with pytest.raises(OptionsError, match="no model to run"):
        ModelSpec().build()
    with pytest.raises(OptionsError, match="missing.py is not a file"):
        ModelSpec(f"{tmp_path / 'missing.py'}:make").build()
    with pytest.raises(OptionsError, match="cannot import 'no_such_module_xyz'"):
        ModelSpec("no_such_module_xyz:make").build()
    (tmp_path / "factories.py").write_text("def three():\n    return 3\n")
    with pytest.raises(OptionsError, match="has no callable 'make'"):
        ModelSpec(f"{tmp_path / 'factories.py'}:make").build()
    with pytest.raises(OptionsError, match="returned int, not a torch.nn.Module"):
        ModelSpec(f"{tmp_path / 'factories.py'}:three").build()
    with pytest.raises(OptionsError, match=r"card fields \['normalization'\] are callables"):
        card_fields(mb.ModelCard(normalization=lambda image: image))
    with pytest.raises(OptionsError, match="--card @.*missing.json: .* is not a file"):
        read_card_fields(f"@{tmp_path / 'missing.json'}")
    with pytest.raises(OptionsError, match="--card is not JSON"):
        read_card_fields("{input_size: 64}")
    with pytest.raises(OptionsError, match="--card is list JSON; expected an object"):
        read_card_fields("[64]")


def test_versions_between_bounds_from_a_list_or_a_wheel_folder(tmp_path):
    listed = list_versions("mlb-toy", "1.0", "2.0", versions=["2.0", "1.0", "0.9", "1.10", "3"])
    assert listed == ["1.0", "1.10", "2.0"]
    with pytest.raises(OptionsError, match="PEP 440"):
        list_versions("mlb-toy", versions=["one"])
    for version in ("1.0", "1.5"):
        write_wheel(tmp_path, version, "")
    assert list_versions("mlb-toy", find_links=tmp_path) == ["1.0", "1.5"]
    with pytest.raises(OptionsError, match="cannot list the versions of 'mlb-nothing'.*--versions"):
        list_versions("mlb-nothing", find_links=tmp_path)


@pytest.mark.skipif(os.name == "nt", reason="a shell script stands in for the environment's python")
def test_a_check_without_a_report_or_with_another_version_is_an_env_failure(tmp_path):
    env = ThrowawayEnv("mlb-toy", "2.0", installer="pip", timeout=5)
    fake = tmp_path / "python"
    env.python = str(fake)

    def python(script: str) -> None:
        fake.write_text("#!/bin/sh\n" + script)
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)

    python("""echo '{"ok": true, "environment": {"packages": {"mlb-toy": "1.0"}}}'\n""")
    with pytest.raises(EnvFailure, match=r"for mlb-toy==2.0 imported version 1.0 instead"):
        env.check(tmp_path / "g.safetensors")
    python("echo 'Traceback: boom' >&2\nexit 1\n")
    with pytest.raises(EnvFailure, match=r"gave no report \(exit 1\): Traceback: boom"):
        env.check(tmp_path / "g.safetensors")
    python("sleep 10\n")
    env.timeout = 0.3
    with pytest.raises(EnvFailure, match="ran longer than 0.3 s"):
        env.check(tmp_path / "g.safetensors")
    with pytest.raises(EnvFailure, match="sleeping took longer than 0.3 s"):
        _run(["sleep", "10"], "sleeping", 0.3)
    with pytest.raises(EnvFailure, match=r"exiting failed \(exit 3\): why"):
        _run([sys.executable, "-c", "import sys; print('why', file=sys.stderr); sys.exit(3)"], "exiting", 30)
