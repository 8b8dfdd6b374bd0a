"""The bundled trained weights: loading, checksums, clear refusals."""

from __future__ import annotations

import shutil

import pytest

import mlbench as mb
from mlbench.errors import MlbenchWarning
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


def _checkpoint(path, seed: int) -> None:
    import torch

    torch.save(mb.build_model("cbam_resunet", "small", seed=seed).state_dict(), path)


def test_a_weights_file_overwritten_in_place_is_reloaded_even_with_its_old_times(tmp_path):
    """Same size, modification time set back: the change time still moves, the sha256 differs, so the
    cache loads the new weights; a file touched with the same bytes keeps its model."""
    import os

    import torch

    from mlbench.models.loading import shared_model

    path = tmp_path / "w.pth"
    _checkpoint(path, seed=1)
    before = os.stat(path)
    first = shared_model(path)
    _checkpoint(path, seed=2)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(path).st_size == before.st_size and os.stat(path).st_mtime_ns == before.st_mtime_ns
    second = shared_model(path)
    expected = mb.build_model("cbam_resunet", "small", seed=2).state_dict()
    assert second is not first and all(torch.equal(v, expected[k]) for k, v in second.state_dict().items())
    os.utime(path)  # touched: new times, same bytes
    assert shared_model(path) is second


def test_the_shared_cache_is_bounded_and_can_be_cleared(tmp_path, monkeypatch):
    from mlbench.models import loading

    monkeypatch.setattr(loading, "SHARED_MAX", 2)
    loading.clear_shared_models()
    paths = [tmp_path / f"w{i}.pth" for i in range(3)]
    for i, path in enumerate(paths):
        _checkpoint(path, seed=i)
    first = loading.shared_model(paths[0])
    loading.shared_model(paths[1])
    assert loading.shared_model(paths[0]) is first  # used last, so paths[1] is the least recent
    loading.shared_model(paths[2])
    assert loading.shared_model(paths[0]) is first and loading.clear_shared_models() == 2
    assert loading.shared_model(paths[0]) is not first


def test_a_shared_model_changed_in_place_is_loaded_again_with_a_warning(tmp_path):
    import torch

    from mlbench.models.loading import shared_model

    path = tmp_path / "w.pth"
    _checkpoint(path, seed=3)
    shared = shared_model(path)
    with torch.no_grad():
        next(shared.parameters()).mul_(0)  # the contract broken: inference only
    with pytest.warns(MlbenchWarning, match=r"changed in place .* take your own copy with mb.load_model"):
        fresh = shared_model(path)
    assert fresh is not shared and next(fresh.parameters()).abs().sum() > 0
    assert shared_model(path) is fresh
