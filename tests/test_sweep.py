"""mb.sweep: rows per (image, model, preset), resume, process pools, crashes, Dask, CLI."""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
import tifffile
from PIL import Image

from mlbench.errors import MlbenchError, OptionsError
from mlbench.studies._sweep import CrashIf, add_sweep_command, read_rows, sweep, sweep_executor, sweep_tasks
from mlbench.samples.synthetic import make_spheroids

MODEL = "cbam_resunet"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four 64 px images: a good one with ground truth, a 48x40 one, an empty and a truncated file."""
    d = tmp_path_factory.mktemp("sweep")
    image, labels = make_spheroids((64, 64), 3, np.random.default_rng(0))
    Image.fromarray((image * 255).astype(np.uint8)).save(d / "a_good.png")
    tifffile.imwrite(d / "a_good_mask.tif", labels)
    Image.fromarray((image[:48, :40] * 255).astype(np.uint8)).save(d / "b_odd.png")
    (d / "c_empty.png").write_bytes(b"")
    (d / "d_trunc.png").write_bytes((d / "a_good.png").read_bytes()[:200])
    return d


def _sweep(folder, **kw):
    kw.setdefault("weights", "untrained")
    kw.setdefault("progress", False)
    kw.setdefault("options", {"input_size": 64})
    return sweep(folder, [MODEL], **kw)


def test_serial_rows_statuses_metrics_and_resume(folder, tmp_path):
    out = tmp_path / "rows.jsonl"
    frame = _sweep(folder, out=out)
    assert list(frame["image"]) == ["a_good.png", "b_odd.png", "c_empty.png", "d_trunc.png"]
    assert list(frame["status"]) == ["ok", "ok", "failed", "failed"]
    empty = frame.set_index("image").loc["c_empty.png"]
    assert (empty["stage"], empty["failure_class"], empty["problems"]) == ("decode", "image_format", "empty")
    good = frame.iloc[0]
    assert 0.0 <= good["iou"] <= 1.0 and good["n_true"] == 3 and good["t_forward"] > 0
    assert np.isnan(frame.iloc[1]["iou"])  # no ground truth for b_odd
    assert len(out.read_text().splitlines()) == 4 and not frame["resumed"].any()
    again = _sweep(folder, out=out)
    assert again["resumed"].all() and len(out.read_text().splitlines()) == 4
    assert list(again["status"]) == list(frame["status"])
    changed = _sweep(folder, out=out, options={"input_size": 64, "threshold": 0.6})  # new options: new keys
    assert not changed["resumed"].any() and len(read_rows(out)) == 8


def test_native_size_breaks_ma_resunet_only_off_multiples_of_16(folder):
    frame = sweep(folder, ["ma_resunet"], weights="untrained", progress=False, options={"resize": "none"})
    status = dict(zip(frame["image"], frame["status"]))
    assert status["a_good.png"] == "ok" and status["b_odd.png"] == "failed"
    assert frame.set_index("image").loc["b_odd.png", "failure_class"] == "shape_mismatch"


def test_timeout_is_recorded(folder):
    frame = _sweep(folder, timeout=0.3, hook=lambda task: time.sleep(2))
    assert set(frame["status"]) == {"timeout"}
    assert "timeout=0.3" in frame["error"].iloc[0]


def test_process_pool_attributes_a_crash_to_its_image(folder, tmp_path):
    with ProcessPoolExecutor(max_workers=2) as pool:
        frame = _sweep(folder, executor=pool, hook=CrashIf("b_odd"), out=tmp_path / "rows.jsonl")
    status = dict(zip(frame["image"], frame["status"]))
    assert status == {"a_good.png": "ok", "b_odd.png": "crashed", "c_empty.png": "failed", "d_trunc.png": "failed"}
    assert "worker process died" in frame.set_index("image").loc["b_odd.png", "error"]
    assert len(read_rows(tmp_path / "rows.jsonl")) == 4


def test_bad_arguments_raise(folder, monkeypatch):
    with pytest.raises(OptionsError, match="expected 'trained'"):
        sweep_tasks(folder, [MODEL], weights="random")
    with pytest.raises(OptionsError, match="preset='served' is unknown"):
        sweep_tasks(folder, [MODEL], ["served"], weights="untrained")
    with pytest.raises(OptionsError, match="is not a folder"):
        sweep_tasks(folder / "a_good.png", [MODEL], weights="untrained")
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(MlbenchError, match="pip install 'mlbench\\[dask\\]'"):
        sweep_executor("local")


def test_progress_is_a_tqdm_bar_with_count_and_eta_and_can_be_switched_off(folder, capsys):
    _sweep(folder, progress=True)
    err = capsys.readouterr().err
    assert "sweep: 100%" in err and "4/4 [" in err and "task/s" in err and "<" in err  # count, elapsed<ETA, rate
    _sweep(folder, progress=False)
    assert capsys.readouterr().err == ""


def _cli(argv):
    parser = argparse.ArgumentParser()
    add_sweep_command(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli(folder, tmp_path, capsys):
    assert _cli(["sweep", str(folder), "--models", MODEL, "--untrained", "--option", "input_size=64",
                 "--out", str(tmp_path / "r.jsonl")]) == 1
    text = capsys.readouterr().out
    assert "c_empty.png" in text and "image_format" in text
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    with pytest.raises(OptionsError, match="is not NAME=VALUE"):
        _cli(["sweep", str(folder), "--option", "resize"])


def test_dask_local_cluster(folder):
    pytest.importorskip("distributed")
    executor = sweep_executor("local", n_workers=1)
    try:
        frame = _sweep(folder, executor=executor)
    finally:
        executor.client.close()
        executor.client.cluster.close()
    assert list(frame["status"]) == ["ok", "ok", "failed", "failed"]
