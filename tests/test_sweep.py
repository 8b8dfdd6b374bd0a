"""mb.sweep: rows per (image, model, preset), resume, process pools, crashes, Dask, CLI."""

from __future__ import annotations

import argparse
import json
import re
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


# ---- a damaged rows file, a torn last line, workers that outlive the sweep (issue 20) ------------------
@pytest.fixture(scope="module")
def done_rows(folder, tmp_path_factory):
    """The rows file of a finished sweep of ``folder``: four lines, a_good, b_odd, c_empty, d_trunc."""
    out = tmp_path_factory.mktemp("done") / "rows.jsonl"
    _sweep(folder, out=out)
    return out.read_bytes()


BAD_LINES = {
    "empty_object": (b"{}", "no text field 'key'"), "null": (b"null", "JSON null"), "number": (b"42", "JSON int"),
    "list": (b"[]", "JSON list"), "string": (b'"row"', "JSON str"),
    "key_not_text": (b'{"key": 1, "image": "a.png", "model": "m", "status": "ok"}', "no text field 'key'"),
    "unknown_status": (b'{"key": "k", "image": "a.png", "model": "m", "status": "done"}', "status 'done' is not one of"),
    "not_utf8": (b'{"key": "\xff\xfe", "status": "ok"}', r"not UTF-8 \(byte 0xff at column 10\)"),
    "not_json": (b'{"key": "abc", "sta', "not JSON"), "nested": (b"[" * 100_000, "not"),
}


def _raw(record: dict) -> bytes:
    """A rejected line's bytes, as it was in the rows file."""
    import base64

    return base64.b64decode(record["base64"]) if "base64" in record else record["text"].encode()


def _rows_of(out) -> list[dict]:
    return [json.loads(line) for line in out.read_bytes().splitlines()]


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_resume_moves_lines_that_are_not_rows_aside_and_loses_no_row(name, folder, done_rows, tmp_path):
    import warnings

    from mlbench.errors import MlbenchWarning

    bad, reason = BAD_LINES[name]
    good = done_rows.splitlines()
    out = tmp_path / "rows.jsonl"
    out.write_bytes(b"\n".join([good[0], bad, good[1], good[2], bad]) + b"\n")  # d_trunc's row is missing: it runs again
    with pytest.warns(MlbenchWarning, match=r"rows.jsonl: 2 line\(s\) that are not sweep rows were moved to \S+rows.jsonl"
                                            r".rejected \(line 2: .*line 5: "):
        frame = _sweep(folder, out=out)
    assert list(frame["status"]) == ["ok", "ok", "failed", "failed"] and list(frame["resumed"]) == [True, True, True, False]
    rows = _rows_of(out)
    assert [r["image"] for r in rows] == ["a_good.png", "b_odd.png", "c_empty.png", "d_trunc.png"]  # each once, none lost
    assert out.read_bytes().startswith(b"\n".join(good[:3]) + b"\n")  # the good lines kept byte for byte
    rejected = [json.loads(line) for line in (tmp_path / "rows.jsonl.rejected").read_text().splitlines()]
    assert [(r["line"], r["file"]) for r in rejected] == [(2, "rows.jsonl"), (5, "rows.jsonl")]
    assert all(_raw(r) == bad for r in rejected) and all(re.search(reason, r["reason"]) for r in rejected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second resume finds nothing to move and adds nothing
        again = _sweep(folder, out=out)
    assert again["resumed"].all() and len(_rows_of(out)) == 4
    assert len((tmp_path / "rows.jsonl.rejected").read_text().splitlines()) == 2


@pytest.mark.parametrize("resume", [True, False])
def test_no_row_is_written_onto_a_torn_last_line(resume, folder, done_rows, tmp_path):
    from mlbench.errors import MlbenchWarning

    good = done_rows.splitlines()
    out = tmp_path / "rows.jsonl"
    out.write_bytes(b"\n".join(good[:3]) + b"\n" + good[3][:40])  # a crash while d_trunc's row was being written
    with pytest.warns(MlbenchWarning, match=r"1 line\(s\) .* \(line 4: torn last line \(no newline at the end\): not JSON"):
        frame = _sweep(folder, out=out, resume=resume)
    assert list(frame["status"]) == ["ok", "ok", "failed", "failed"]
    rows = _rows_of(out)  # every line parses: the new row has a line of its own
    assert [r["image"] for r in rows][-1] == "d_trunc.png" and out.read_bytes().endswith(b"\n")
    assert len(rows) == (4 if resume else 7)  # without resume every task runs again and is appended
    rejected = json.loads((tmp_path / "rows.jsonl.rejected").read_text())
    assert rejected["line"] == 4 and _raw(rejected) == good[3][:40]


def test_a_last_row_without_its_newline_keeps_its_place_and_gets_one(folder, done_rows, tmp_path):
    import warnings

    out = tmp_path / "rows.jsonl"
    out.write_bytes(done_rows.rstrip(b"\n"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame = _sweep(folder, out=out)
    assert frame["resumed"].all() and out.read_bytes() == done_rows and not (tmp_path / "rows.jsonl.rejected").exists()


def test_a_repair_cut_short_adds_no_duplicate(done_rows, tmp_path, monkeypatch):
    """Lines are set aside before the rows file is replaced; a crash between the two, then another repair,
    leaves each rejected line there once."""
    from mlbench.errors import MlbenchWarning
    from mlbench.studies import _sweep_rows

    out = tmp_path / "rows.jsonl"
    out.write_bytes(done_rows + b"null\n{}\n")
    monkeypatch.setattr(_sweep_rows, "_replace", lambda path, data: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        _sweep_rows.repair_rows(out)
    monkeypatch.undo()
    with pytest.warns(MlbenchWarning, match="2 line"):
        repair = _sweep_rows.repair_rows(out)
    assert len(repair.rows) == 4 and repair.rejected == ((5, "not a row: JSON null, not an object"), (6, "not a row: no text field 'key'"))
    assert len((tmp_path / "rows.jsonl.rejected").read_text().splitlines()) == 2 and out.read_bytes() == done_rows
    assert read_rows(out).keys() == repair.rows.keys()


def test_process_pool_refuses_a_bad_worker_count():
    from mlbench.studies.executors import process_pool

    with pytest.raises(OptionsError, match=r"process_pool\(workers=0\): the number of worker processes is a positive"):
        process_pool(0)
    with pytest.raises(OptionsError, match="expected 'processes' or 'processes:N'"):
        sweep_executor("processes:two")


def test_kill_9_of_a_processes_2_sweep_leaves_no_worker(folder):
    """``--executor processes:2``'s pool (``sweep_executor("processes:2")``): its workers die with the
    sweep's process, killed with SIGKILL while both run a task (PR_SET_PDEATHSIG, and the watchdog)."""
    import os
    import signal
    import subprocess

    psutil = pytest.importorskip("psutil")
    code = ("import sys, time\nfrom mlbench.studies._sweep import _cli_executor, sweep\n"
            "class Sleep:\n    def __call__(self, task):\n        time.sleep(120)\n"
            f"sweep({str(folder)!r}, [{MODEL!r}], executor=_cli_executor('processes:2', 2), weights='untrained', "
            "progress=False, hook=Sleep(), options={'input_size': 64})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parent, workers = psutil.Process(proc.pid), []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:
            workers = parent.children(recursive=True)
            time.sleep(0.2)
        assert len(workers) >= 2, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no workers"
        time.sleep(1.0)  # both take a task and sleep in it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not [w.pid for w in workers if _alive(w)], "workers outlived the killed sweep"
    finally:
        for worker in workers:
            if _alive(worker):
                worker.kill()
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _alive(process) -> bool:
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
