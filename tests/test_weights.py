"""check_weights / read_checkpoint on checkpoints with every defect, generated here."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import unittest.mock
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mlbench as mb
from mlbench.checks.weights import add_check_weights_command, check_weights, read_checkpoint
from mlbench.models.checkpoint_io import strip_prefix


@pytest.fixture(scope="module")
def state_dict():
    return mb.build_model("ma_resunet", "small", seed=1).state_dict()


def codes(report):
    return [p.code for p in report.problems]


class Evil:
    """A pickle that would run a shell command when unpickled."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_missing_reports_absolute_path_and_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = check_weights("weights/hrnet_best_model.pth")
    assert codes(report) == ["missing"] and not report.exists
    assert report.absolute_path == f"{tmp_path}/weights/hrnet_best_model.pth" and report.cwd == str(tmp_path)
    assert f"working directory {tmp_path}" in report.problems[0].message


def test_empty_truncated_and_html(tmp_path, state_dict):
    (tmp_path / "empty.pth").write_bytes(b"")
    torch.save(state_dict, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "page.pth").write_text("<html>404 Not Found</html>")
    assert codes(check_weights(tmp_path / "empty.pth")) == ["empty"]
    cut = check_weights(tmp_path / "cut.pth")
    assert codes(cut) == ["truncated"] and "failed finding central directory" in cut.problems[0].message
    assert codes(check_weights(tmp_path / "page.pth")) == ["not_a_checkpoint"]
    with pytest.raises(RuntimeError, match="failed finding central directory"):
        torch.load(tmp_path / "cut.pth", weights_only=True)  # what PyTorch says instead


def test_flipped_byte_found_by_crc(tmp_path, state_dict):
    path = tmp_path / "flip.pth"
    torch.save(state_dict, path)
    with zipfile.ZipFile(path) as archive:
        member = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 1000)
    data = bytearray(path.read_bytes())
    offset = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra) + 100
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # PyTorch loads it silently
    report = check_weights(path)
    assert report.crc_ok is False and codes(report)[0] == "crc_mismatch" and member.filename in report.problems[0].message


def test_legacy_pickle_and_safetensors_load(tmp_path, state_dict):
    torch.save(state_dict, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    save_file(dict(state_dict), str(tmp_path / "w.safetensors"))
    legacy = check_weights(tmp_path / "old.pth", model="ma_resunet")
    assert legacy.format == "legacy_pickle" and legacy.ok and legacy.tensors == len(state_dict)
    safe = check_weights(tmp_path / "w.safetensors")
    assert safe.format == "safetensors" and safe.ok and safe.best_fit.model == "ma_resunet"
    assert safe.best_fit.widths == "small" and safe.best_fit.score == 1.0


def test_training_dict_with_namespace_loads_by_named_allowlist(tmp_path, state_dict):
    path = tmp_path / "ma_resunet_best_model.pth"
    torch.save({"model_state_dict": state_dict, "optimizer_state_dict": {}, "epoch": 7, "best_iou": 0.9,
                "args": argparse.Namespace(lr=1e-3, batch_size=4)}, path)
    with pytest.raises(Exception, match="Unsupported global: GLOBAL argparse.Namespace"):
        torch.load(path, weights_only=True)
    report = check_weights(path)
    assert report.ok and report.unsafe_globals == ("argparse.Namespace",)
    assert report.load == "weights_only=True with the named allowlist ['argparse.Namespace']"
    assert "under 'model_state_dict'" in report.container
    loaded, _ = read_checkpoint(path)
    assert list(loaded) == list(state_dict)


@pytest.mark.parametrize("prefix", ["module.", "module.model."])
def test_prefix_detected_and_repaired(tmp_path, state_dict, prefix):
    path = tmp_path / "dp.pth"
    torch.save(OrderedDict((prefix + k, v) for k, v in state_dict.items()), path)
    model = mb.build_model("ma_resunet", "small", seed=5)
    result = model.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert len(result.missing_keys) == len(state_dict)  # strict=False loads nothing, silently
    report = check_weights(path, model="ma_resunet")
    assert codes(report) == ["prefix"] and report.prefix == prefix
    repaired, _ = read_checkpoint(path, model="ma_resunet")
    model.load_state_dict(repaired, strict=True)
    key = next(k for k, v in state_dict.items() if v.is_floating_point() and v.unique().numel() > 1)
    assert torch.equal(model.state_dict()[key], state_dict[key])


def test_wrong_architecture_ranked(tmp_path, state_dict):
    path = tmp_path / "w.pth"
    torch.save(state_dict, path)
    report = check_weights(path, model="hrnet")
    assert codes(report) == ["no_keys_match"] and report.best_fit.model == "ma_resunet"
    assert len(report.diff["missing"]) == len(mb.build_model("hrnet", device="meta").state_dict())
    with pytest.raises(mb.WeightsError, match=r"cannot use .*w.pth: \['no_keys_match'\]"):
        read_checkpoint(path, model="hrnet")


def test_other_widths_detected_and_shape_mismatch(tmp_path):
    path = tmp_path / "wide.pth"
    wide = mb.build_model("ma_resunet", widths=(16, 32, 64, 128))
    torch.save(wide.state_dict(), path)
    report = check_weights(path, model=mb.build_model("ma_resunet", "small"))
    assert "key_mismatch" in codes(report) and report.diff["shape"]
    assert report.best_fit.model == "ma_resunet" and report.best_fit.score == 1.0
    assert check_weights(path, model="ma_resunet").ok  # a name is built with the detected widths


def test_nan_and_fp16(tmp_path, state_dict):
    broken = OrderedDict((k, v.clone()) for k, v in state_dict.items())
    first = next(k for k, v in broken.items() if v.is_floating_point() and v.numel() > 4)
    broken[first][0] = float("nan")
    torch.save(broken, tmp_path / "nan.pth")
    report = check_weights(tmp_path / "nan.pth")
    assert codes(report) == ["nonfinite"] and first in report.problems[0].message
    half = OrderedDict((k, v.half() if v.is_floating_point() else v) for k, v in state_dict.items())
    torch.save(half, tmp_path / "half.pth")
    report = check_weights(tmp_path / "half.pth", model="ma_resunet")
    assert codes(report) == [] and "float16" in report.dtypes  # into float32: exact, no problem
    report = check_weights(tmp_path / "half.pth", model=mb.build_model("ma_resunet", "small").double())
    assert codes(report) == []
    full = OrderedDict((k, v.float()) for k, v in state_dict.items())
    torch.save(full, tmp_path / "full.pth")
    report = check_weights(tmp_path / "full.pth", model=mb.build_model("ma_resunet", "small").half())
    assert codes(report) == ["dtype_mismatch"] and "losing precision" in report.problems[0].message


def test_saved_on_cuda_detected_on_cpu(tmp_path, state_dict):
    # Faked: torch.save asks torch.serialization.location_tag for each storage's device; patching
    # it makes the storage records say "cuda:0", exactly as a file saved from a GPU does.
    path = tmp_path / "gpu.pth"
    with unittest.mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        torch.save(state_dict, path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="Attempting to deserialize object on a CUDA device"):
            torch.load(path, weights_only=True)
    report = check_weights(path)
    assert report.devices == ("cuda:0",) and report.tensors == len(state_dict)
    assert codes(report) == ([] if torch.cuda.is_available() else ["saved_on_cuda"])


def test_a_whole_pickled_model_is_not_called_malicious(tmp_path):
    """torch.save(model) pickles builtins.set (the module's non-persistent buffers): not on torch's
    allowlist, but it only builds a value; the advice is to re-save the state dict, not to distrust it."""
    path = tmp_path / "whole_model.pth"
    torch.save(mb.build_model("cbam_resunet", size="small"), path)
    report = check_weights(path)
    assert codes(report) == ["unsafe_globals"] and "__builtin__.set" in report.unsafe_globals  # protocol 2 names
    assert "torch.save(model.state_dict())" in report.problems[0].message


@pytest.mark.parametrize("legacy", [False, True])
def test_evil_pickle_detected_without_execution(tmp_path, legacy):
    sentinel = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    if legacy:
        path.write_bytes(pickle.dumps({"state_dict": Evil(sentinel)}))
    else:
        torch.save({"state_dict": Evil(sentinel)}, path)
    report = check_weights(path)
    assert codes(report) == ["code_execution"] and report.unsafe_globals == (f"{os.system.__module__}.system",)
    assert report.load.startswith("refused") and not sentinel.exists()
    with pytest.raises(mb.WeightsError, match="code_execution"):
        read_checkpoint(path)
    assert not sentinel.exists()


def test_strip_prefix_and_bad_model_argument(tmp_path):
    stripped, prefix = strip_prefix({"module.a": torch.zeros(1), "module.b": torch.zeros(1)})
    assert list(stripped) == ["a", "b"] and prefix == "module."
    assert strip_prefix({"a": torch.zeros(1), "module.b": torch.zeros(1)})[1] == ""
    with pytest.raises(mb.OptionsError, match="model must be a model name or an nn.Module, got int"):
        check_weights(tmp_path / "x.pth", model=3)


def test_cli_json_and_exit_status(tmp_path, state_dict, capsys):
    parser = argparse.ArgumentParser(prog="mlbench")
    add_check_weights_command(parser.add_subparsers(dest="command", required=True))
    torch.save(state_dict, tmp_path / "good.pth")
    args = parser.parse_args(["check-weights", str(tmp_path / "good.pth"), "--model", "ma_resunet", "--json"])
    assert args.run(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is True and out["fits"][0]["model"] == "ma_resunet"
    args = parser.parse_args(["check-weights", str(tmp_path / "none.pth")])
    assert args.run(args) == 1 and "problem [missing]" in capsys.readouterr().out


def test_truncated_safetensors(tmp_path, state_dict):
    save_file(dict(state_dict), str(tmp_path / "w.safetensors"))
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut_data.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "cut_header.safetensors").write_bytes(data[:40])
    (tmp_path / "appended.safetensors").write_bytes(data + b"<html>")
    cut_data = check_weights(tmp_path / "cut_data.safetensors")
    header = 8 + int.from_bytes(data[:8], "little")
    assert cut_data.format == "safetensors" and not cut_data.ok and cut_data.problems[0].code == "truncated"
    assert (f"describes {len(data) - header:,} bytes of tensor data but the file holds {len(data) - header - 100:,}"
            in cut_data.problems[0].message)
    cut_header = check_weights(tmp_path / "cut_header.safetensors")
    assert cut_header.format == "safetensors" and cut_header.problems[0].code == "truncated"
    assert "but the file has only 40 bytes" in cut_header.problems[0].message
    appended = check_weights(tmp_path / "appended.safetensors")
    assert [p.code for p in appended.problems] == ["load_failed"]
    assert appended.problems[0].message.startswith("6 bytes follow the") and "appended" in appended.problems[0].message


def test_unusual_shared_prefix_is_found_by_the_known_keys(tmp_path, state_dict):
    """torch.compile's `_orig_mod.` and a wrapper named by its owner (`encoder_decoder.`) are stripped too."""
    for prefix in ("_orig_mod.", "encoder_decoder."):
        torch.save({prefix + k: v for k, v in state_dict.items()}, tmp_path / "w.pth")
        report = check_weights(tmp_path / "w.pth", model="ma_resunet")
        assert report.prefix == prefix and [p.code for p in report.problems] == ["prefix"]
    torch.save({"backbone." + k: v for k, v in state_dict.items() if "conv" in k}, tmp_path / "partial.pth")
    assert check_weights(tmp_path / "partial.pth", model="ma_resunet").prefix in ("", "backbone.")


def _files_that_are_not_checkpoints(tmp_path, state_dict) -> dict[str, str]:
    """Files users pass as the weights by mistake, written by their own libraries."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "cells.png")
    np.savez(tmp_path / "weights.npz", **{k: v.numpy() for k, v in list(state_dict.items())[:3]})
    np.save(tmp_path / "weights.npy", np.zeros(3, np.float32))
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(120))
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch\x1a\x052.1.0" + bytes(120))
    model = mb.build_model("cbam_resunet", "small", seed=1).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated and the trace warns about the size checks
        torch.jit.trace(model, torch.zeros(1, 3, 64, 64), check_trace=False).save(tmp_path / "traced.pt")
    torch.save(state_dict, tmp_path / "full.pth")
    with zipfile.ZipFile(tmp_path / "full.pth") as full, zipfile.ZipFile(tmp_path / "no_data_pkl.pth", "w") as out:
        for info in full.infolist():
            if not info.filename.endswith("data.pkl"):
                out.writestr(info, full.read(info.filename))
    with zipfile.ZipFile(tmp_path / "folder.zip", "w") as out:
        out.writestr("run_12/notes.txt", "lr 1e-3")
    return {"cells.png": "PNG image, not weights", "weights.npz": "NumPy .npz archive", "weights.npy": "NumPy array",
            "model.h5": "HDF5 file", "model.onnx": "ONNX model", "traced.pt": "TorchScript archive",
            "no_data_pkl.pth": "lost its data.pkl", "folder.zip": "no data.pkl: torch.save did not write it"}


def test_a_file_that_is_no_checkpoint_is_named(tmp_path, state_dict):
    """An image, a NumPy file, Keras, ONNX or TorchScript passed as the weights: the report says which (and how to
    convert where one can), instead of 'not a PyTorch zip, legacy pickle or safetensors file'; loading refuses it."""
    expected_codes = {"traced.pt": "torchscript", "no_data_pkl.pth": "truncated"}
    for name, says in _files_that_are_not_checkpoints(tmp_path, state_dict).items():
        report = check_weights(tmp_path / name, "cbam_resunet")
        assert codes(report) == [expected_codes.get(name, "not_a_checkpoint")], (name, report.problems)
        assert says in report.problems[0].message, (name, report.problems[0].message)
        with pytest.raises(mb.WeightsError, match=says.split(",")[0].split(":")[0]):
            mb.load_model(tmp_path / name, model="cbam_resunet")


def test_integer_weights_are_refused(tmp_path, state_dict):
    """int8 weights (quantised, their scales elsewhere) would be cast to float by load_state_dict: garbage out.
    num_batches_tracked stays an integer buffer and is no problem."""
    quantised = {k: (v * 100).round().clamp(-128, 127).to(torch.int8) if v.is_floating_point() else v
                 for k, v in state_dict.items()}
    save_file(quantised, tmp_path / "int8.safetensors")
    report = check_weights(tmp_path / "int8.safetensors")
    assert codes(report) == ["integer_weights"] and "int8" in report.problems[0].message
    with pytest.raises(mb.WeightsError, match=r"\[integer_weights\]"):
        mb.load_model(tmp_path / "int8.safetensors", model="ma_resunet")
    torch.save({**state_dict, "extra.norm.num_batches_tracked": torch.tensor(7)}, tmp_path / "counter.pth")
    assert "integer_weights" not in codes(check_weights(tmp_path / "counter.pth"))


def test_state_dicts_under_other_names_or_with_notes_in_them(tmp_path, state_dict):
    """A training dict's weights under a name of its own are found (the one entry of tensors); a state dict with
    an int and a str saved into it loads without them, which the report names; two candidates ask for key=."""
    torch.save({"epoch": 3, "model_state": state_dict, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "named.pth")
    report = check_weights(tmp_path / "named.pth", model="ma_resunet")
    assert codes(report) == [] and "under 'model_state' (the one entry of tensors)" in report.container
    model = mb.load_model(tmp_path / "named.pth", model="ma_resunet")
    assert torch.equal(next(iter(model.state_dict().values())), next(iter(state_dict.values())))
    torch.save({**state_dict, "epoch": 12, "arch": "ma_resunet"}, tmp_path / "notes.pth")
    report = check_weights(tmp_path / "notes.pth", model="ma_resunet")
    assert codes(report) == [] and "left out: 'arch' (str), 'epoch' (int)" in report.container
    torch.save({"generator": state_dict, "discriminator": state_dict}, tmp_path / "two.pth")
    report = check_weights(tmp_path / "two.pth")
    assert "no_state_dict" in codes(report) and "pass key=" in report.container


def test_a_checkpoint_of_another_model_is_named_so(tmp_path):
    """A checkpoint that shares no key with any registered architecture is not said to "fit" the first of them
    with 0 keys: it is another model's, and its keys show which."""
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(8, 4), "classifier.weight": torch.zeros(2, 4)},
               tmp_path / "pytorch_model.bin")
    alone = check_weights(tmp_path / "pytorch_model.bin")
    against = check_weights(tmp_path / "pytorch_model.bin", model="cbam_resunet")
    for report in (alone, against):
        text = report.problems[0].message
        assert "shares no key with any registered architecture" in text and "bert.embeddings" in text
        assert "0/" not in text
    assert codes(against) == ["no_keys_match"]


def test_a_users_model_whose_attribute_is_a_wrapper_name_loads_as_saved(tmp_path):
    """``net.`` and ``model.`` are stripped as wrappers only where the keys do not already fit the model."""

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Conv2d(3, 1, 1)

    saved = Wrapped()
    path = tmp_path / "own.pth"
    torch.save(saved.state_dict(), path)
    loaded = mb.load_model(path, model=Wrapped())
    assert torch.equal(loaded.net.weight, saved.net.weight)
    with pytest.raises(mb.WeightsError, match="no entry 'ema'.*pass no key"):
        mb.load_model(path, model=Wrapped(), key="ema")


def test_value_classes_are_not_code_and_pagers_are():
    from mlbench.models.checkpoint_formats import is_code_global

    assert not any(map(is_code_global, ["pathlib.PosixPath", "types.SimpleNamespace", "argparse.Namespace"]))
    assert all(map(is_code_global, ["pydoc.pipepager", "numpy.testing._private.utils.runstring", "os.system"]))


def test_valid_files_of_other_protocols_and_exports_are_named_not_called_damaged(tmp_path, state_dict):
    torch.save(state_dict, tmp_path / "p4.pth", pickle_protocol=4)
    report = check_weights(tmp_path / "p4.pth")
    assert codes(report) == ["load_failed"]
    assert "pickle protocol 4" in report.problems[0].message and "damaged" not in report.problems[0].message
    for module, suffix, says in [("bz2", "bz2", "bunzip2"), ("lzma", "xz", "unxz")]:
        data = __import__(module).compress((tmp_path / "p4.pth").read_bytes()[:4096])
        (tmp_path / f"w.pth.{suffix}").write_bytes(data)
        assert says in check_weights(tmp_path / f"w.pth.{suffix}").problems[0].message


def test_a_torch_export_archive_is_named(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 1, 1)

        def forward(self, x):
            return self.conv(x)

    torch.export.save(torch.export.export(Tiny(), (torch.zeros(1, 3, 8, 8),)), tmp_path / "m.pt2")
    report = check_weights(tmp_path / "m.pt2")
    assert codes(report) == ["not_a_checkpoint"] and "torch.export archive" in report.problems[0].message


def test_bad_arguments_get_clear_errors(tmp_path):
    from mlbench.models.loading import weights_path

    with pytest.raises(mb.OptionsError, match="path must be the checkpoint's path"):
        check_weights(None)
    with pytest.raises(mb.OptionsError, match="budgets must be a mlbench.budgets.Budgets, got dict"):
        check_weights(weights_path("hrnet"), budgets={})
    with pytest.raises(mb.OptionsError, match="device='gpu0' cannot be used.*Invalid device string"):
        mb.load_model("hrnet", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(mb.OptionsError, match="device='cuda' cannot be used.*pass device='cpu'"):
            mb.load_model("hrnet", device="cuda")
    assert check_weights(weights_path("hrnet"), "hrnet").ok  # float16 weights into a float32 model: exact


def test_a_few_keys_outside_the_wrapper_are_named_and_left_out(tmp_path, state_dict):
    """A Lightning module's loss buffer beside its ``model.`` weights, SWA's ``n_averaged`` beside
    ``module.``: the weights load, and the keys left out are said."""
    lightning = OrderedDict(("model." + k, v) for k, v in state_dict.items())
    lightning["criterion.pos_weight"] = torch.tensor([3.0])
    torch.save({"state_dict": lightning}, tmp_path / "l.ckpt")
    averaged = torch.optim.swa_utils.AveragedModel(mb.build_model("ma_resunet", "small"))
    torch.save(averaged.state_dict(), tmp_path / "swa.pth")
    for name, outside in [("l.ckpt", "criterion.pos_weight"), ("swa.pth", "n_averaged")]:
        report = check_weights(tmp_path / name, model="ma_resunet")
        assert codes(report) == ["outside_wrapper", "prefix"] and outside in report.problems[0].message
        mb.load_model(tmp_path / name, model="ma_resunet")


def test_without_a_model_the_keys_that_keep_the_best_fit_are_named(tmp_path):
    weights = OrderedDict(mb.build_model("cbam_resunet", "small").state_dict())
    head = next(k for k in reversed(weights) if k.endswith(".weight") and weights[k].dim() == 4)
    weights[head] = torch.zeros(2, *weights[head].shape[1:])  # a two-class head
    del weights[next(iter(weights))]
    torch.save(weights, tmp_path / "two_classes.pth")
    message = check_weights(tmp_path / "two_classes.pth").problems[0].message
    assert "best: cbam_resunet" in message and "1 missing" in message
    assert f"1 of another shape ['{head}: (2," in message



def test_numpy_numbers_are_refused_unloaded_even_a_crafted_object_scalar(tmp_path, state_dict):
    """NumPy's scalar reconstructor and dtype are not allowlisted: a crafted object-dtype scalar whose
    bytes are read as a pointer crashes the process that unpickles it, so such a file is never loaded,
    and the report says how to re-save the numbers."""
    torch.save({"state_dict": state_dict, "best_iou": np.float64(0.81)}, tmp_path / "t.pth")
    report = check_weights(tmp_path / "t.pth")
    assert codes(report) == ["unsafe_globals"] and "nothing was unpickled" in report.load
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(2)}, "best": 1.5}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    name = next(n for n in source.namelist() if n.endswith("data.pkl"))

    def text(value: str) -> bytes:
        return b"X" + struct.pack("<I", len(value.encode())) + value.encode()

    crafted = (b"cnumpy._core.multiarray\nscalar\ncnumpy\ndtype\n" + text("O8") + b"\x89\x88\x87R"
               + b"(K\x03" + text("|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
               + b"c_codecs\nencode\n" + text("\x41" * 8) + text("latin1") + b"\x86R\x86R")
    pickled = source.read(name).replace(b"G" + struct.pack(">d", 1.5), crafted)
    with zipfile.ZipFile(tmp_path / "crafted.pth", "w") as target:
        for info in source.infolist():
            target.writestr(info.filename, pickled if info.filename == name else source.read(info.filename))
    report = check_weights(tmp_path / "crafted.pth")  # a crash here would kill the test process
    assert "unsafe_globals" in codes(report) and "nothing was unpickled" in report.load

def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path, state_dict):
    torch.save(state_dict, tmp_path / "w.pth")
    with zipfile.ZipFile(tmp_path / "w.pth") as archive:
        prefix = archive.namelist()[0].split("/")[0]
    with zipfile.ZipFile(tmp_path / "bomb.pth", "w") as bomb:
        bomb.writestr(f"{prefix}/data.pkl", b"\x80\x02" + b"\0" * (64 * 2**20), compress_type=zipfile.ZIP_DEFLATED)
    message = check_weights(tmp_path / "bomb.pth").problems[0].message
    assert "inflates" in message and "zip bomb" in message and "it was not inflated" in message


def test_float8_weights_are_checked_not_crashed_on(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 1, 1))
    torch.save({k: v.to(torch.float8_e4m3fn) for k, v in model.state_dict().items()}, tmp_path / "fp8.pth")
    report = check_weights(tmp_path / "fp8.pth", model=model)
    assert "dtype_mismatch" not in codes(report) and "float8_e4m3fn" in report.dtypes
    torch.save({k: v.long() for k, v in model.state_dict().items()}, tmp_path / "int.pth")
    assert "dtype_mismatch" in codes(check_weights(tmp_path / "int.pth", model=model))  # integers into floats


def test_a_plain_pickle_is_named_not_called_damaged(tmp_path):
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"w": [1.0]}, protocol=2))
    message = check_weights(tmp_path / "plain.pkl").problems[0].message
    assert "plain pickle (pickle.dump, joblib)" in message and "Restore a good copy" not in message


def test_a_state_dict_one_level_further_down_is_found(tmp_path, state_dict):
    """{"model": {"state_dict": ...}} and {"model": <state dict with an epoch in it>} load; the report says where."""
    torch.save({"model": {"state_dict": state_dict}, "epoch": 1}, tmp_path / "two_levels.pth")
    report = check_weights(tmp_path / "two_levels.pth", model="ma_resunet")
    assert codes(report) == [] and "under 'model'" in report.container and "'state_dict'" in report.container
    torch.save({"model": {**state_dict, "epoch": 3}, "optimizer": {}}, tmp_path / "noted.pth")
    report = check_weights(tmp_path / "noted.pth", model="ma_resunet")
    assert codes(report) == [] and "'epoch' (int)" in report.container
    mb.load_model(tmp_path / "noted.pth", model="ma_resunet")


def test_nested_and_complex_tensors_are_checked_not_crashed_on(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nested tensors are a prototype
        torch.save({"a.weight": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])}, tmp_path / "nested.pth")
    report = check_weights(tmp_path / "nested.pth")
    assert "unsupported_tensor" in codes(report) and "nested tensor" in report.problems[0].message
    with pytest.raises(mb.WeightsError, match="nested tensor"):
        mb.load_model(tmp_path / "nested.pth", model="ma_resunet")
    torch.save({"a.weight": torch.tensor([1 + 1j, complex(float("nan"), 0)])}, tmp_path / "complex.pth")
    assert "nonfinite" in codes(check_weights(tmp_path / "complex.pth"))


def test_safetensors_headers_in_other_spellings_and_formats_it_refuses(tmp_path, state_dict):
    """A header pretty-printed or after a newline is valid safetensors; one with a non-string metadata value
    is refused with the reason, not called truncated."""
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "plain.safetensors")
    data = (tmp_path / "plain.safetensors").read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + length]), data[8 + length:]

    def write(name: str, text: bytes) -> str:
        (tmp_path / name).write_bytes(struct.pack("<Q", len(text)) + text + body)
        return tmp_path / name

    indented = write("indented.safetensors", b"\n" + json.dumps(header, indent=2).encode())
    assert codes(check_weights(indented, model="ma_resunet")) == []
    meta = write("meta.safetensors", json.dumps({**header, "__metadata__": {"epoch": 3}}).encode())
    report = check_weights(meta)
    assert codes(report) == ["load_failed"] and "metadata values must be strings" in report.problems[0].message
    assert "truncated" not in report.problems[0].message


def test_text_zeros_and_appended_bytes_are_named(tmp_path, state_dict):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 10}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}))
    report = check_weights(tmp_path / "model.safetensors.index.json")
    assert codes(report) == ["not_a_checkpoint"] and "sharded checkpoint" in report.problems[0].message
    (tmp_path / "zeros.pth").write_bytes(bytes(4096))
    assert "all zero" in check_weights(tmp_path / "zeros.pth").problems[0].message
    torch.save(state_dict, tmp_path / "sd.pth")
    whole = (tmp_path / "sd.pth").read_bytes()
    (tmp_path / "appended.pth").write_bytes(whole + b"<html>error</html>" * 10_000)
    report = check_weights(tmp_path / "appended.pth")
    assert codes(report)[:1] == ["load_failed"] and f"end of the zip archive at byte {len(whole):,}" in report.problems[0].message
    (tmp_path / "cut.pth").write_bytes(whole[: len(whole) * 3 // 4])
    assert codes(check_weights(tmp_path / "cut.pth"))[:1] == ["truncated"]


def test_a_partial_is_judged_by_what_it_wraps(tmp_path):
    """timm's partial(nn.LayerNorm, eps=1e-6) in a pickled model is not code (still not on the allowlist); a
    partial of os.system is."""
    import functools

    class WrapsSystem:
        def __reduce__(self):
            return (functools.partial(os.system, "true"), ())

    torch.save({"norm": functools.partial(torch.nn.LayerNorm, eps=1e-6)}, tmp_path / "partial.pth")
    assert codes(check_weights(tmp_path / "partial.pth"))[:1] == ["unsafe_globals"]
    torch.save({"a": WrapsSystem()}, tmp_path / "system.pth")
    assert "code_execution" in codes(check_weights(tmp_path / "system.pth"))


def test_two_saves_in_one_file_are_named(tmp_path, state_dict):
    with open(tmp_path / "two.pth", "ab") as handle:
        torch.save({"epoch": 1}, handle)
        start = handle.tell()
        torch.save(state_dict, handle)
    report = check_weights(tmp_path / "two.pth")
    assert codes(report)[:1] == ["load_failed"] and f"{start:,} bytes come before the zip archive" in report.problems[0].message
    (tmp_path / "fixed.pth").write_bytes((tmp_path / "two.pth").read_bytes()[start:])
    assert codes(check_weights(tmp_path / "fixed.pth", model="ma_resunet")) == []
