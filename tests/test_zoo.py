"""The bundled trained weights: loading, checksums, clear refusals."""

from __future__ import annotations

import shutil

import pytest

import mlbench as mb
from mlbench.paths import data_dir


@pytest.fixture()
def data_copy(tmp_path, monkeypatch):
    """A private copy of data/weights (and samples) that a test may damage."""
    shutil.copytree(data_dir() / "weights", tmp_path / "weights")
    monkeypatch.setenv("MLBENCH_DATA", str(tmp_path))
    return tmp_path


def test_load_model_is_trained_eval_and_checked():
    model = mb.load_model("resunet_advanced")
    assert model.mlbench_name == "ma_resunet" and not model.training
    assert len(mb.card(model).sha256) == 64 and mb.card(model).input_size == 256
    assert all(p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in model.parameters())


def test_load_model_refuses_a_changed_file(data_copy):
    path = data_copy / "weights" / "hrnet.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(mb.WeightsError, match=r"hrnet.safetensors has sha256 [0-9a-f]{16}\.\.\. but the manifest expects"):
        mb.load_model("hrnet")


def test_load_model_missing_file_and_manifest(data_copy):
    (data_copy / "weights" / "cbam_resunet.safetensors").unlink()
    with pytest.raises(mb.WeightsError, match=r"cbam_resunet.safetensors is missing \(working directory"):
        mb.load_model("cbam_resunet")
    (data_copy / "weights" / "manifest.json").unlink()
    with pytest.raises(mb.WeightsError, match="weights manifest not found"):
        mb.load_model("hrnet")


def test_manifest_records_quality():
    from mlbench.models.loading import load_manifest

    for name, entry in load_manifest()["models"].items():
        assert entry["heldout_pixel_iou"] >= 0.90, name
        assert entry["normalization"]["mean"] == [0.485, 0.456, 0.406]


def test_named_models_are_loaded_once_and_reloaded_when_the_file_changes(tmp_path):
    import os

    import torch

    from mlbench.models.loading import shared_model

    assert shared_model("cbam_resunet") is shared_model("resunet_small")  # one file, one model
    first = mb.Pipeline("cbam_resunet").model
    assert first is shared_model("cbam_resunet")
    path = tmp_path / "w.pth"
    torch.save(mb.build_model("cbam_resunet", "small", seed=1).state_dict(), path)
    loaded = shared_model(path)
    assert shared_model(str(path)) is loaded
    torch.save(mb.build_model("cbam_resunet", "small", seed=2).state_dict(), path)
    os.utime(path, ns=(10**18, 10**18))  # a new version of the file: reloaded, never the stale copy
    again = shared_model(path)
    assert again is not loaded and mb.card(again).sha256 != mb.card(loaded).sha256
