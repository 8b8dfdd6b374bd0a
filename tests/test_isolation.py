"""Decoding in a child process: what comes back is what the in-process decode gives, and a crash,
a runaway allocation or a hang in the child is a clean error here, after which the child is replaced."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import mlbench as mb
from mlbench.budgets import Budgets
from mlbench.errors import ImageError, OptionsError
from mlbench.isolation import ChildProcess, call_isolated, isolate_default


@pytest.fixture
def child():
    process = ChildProcess()
    yield process
    process._stop()


def _call(child, target, *args, memory=1 << 28, seconds=30.0):
    return child.call(target, args, {}, memory_bytes=memory, seconds=seconds, error=ImageError, what="the call")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_an_isolated_read_returns_the_same_array_and_report(tmp_path, dtype):
    image = (np.random.default_rng(0).random((300, 200, 3)) * 4000).astype(dtype)
    path = tmp_path / "image.tif"
    tifffile.imwrite(path, image, photometric="rgb")
    inside, report = mb.read_image(path, isolate=False)
    outside, isolated = mb.read_image(path, isolate=True)
    assert outside.dtype == inside.dtype and outside.flags.writeable
    np.testing.assert_array_equal(outside, inside)
    assert isolated == report


def test_an_isolated_read_names_the_file_as_given_from_the_callers_folder(tmp_path, monkeypatch):
    tifffile.imwrite(tmp_path / "here.tif", np.zeros((8, 8), np.uint8))
    monkeypatch.chdir(tmp_path)  # after the shared child started elsewhere
    _, report = mb.read_image("here.tif", isolate=True)
    assert report.name == "here.tif"
    with pytest.raises(ImageError, match="missing.png: .*does not exist"):
        mb.read_image("missing.png", isolate=True)


def test_a_crash_in_the_child_is_an_error_naming_the_signal_and_the_child_is_replaced(child):
    first = _call(child, "os:getpid")
    with pytest.raises(ImageError, match=r"the call crashed the child process it ran in \(signal SIGSEGV\); this "
                                         r"process is unaffected") as caught:
        _call(child, "ctypes:string_at", 0)
    assert caught.value.budget is None
    assert _call(child, "os:getpid") != first


def test_an_allocation_past_max_decoder_memory_is_refused_in_the_child(child):
    with pytest.raises(ImageError, match="exceeds the budget max_decoder_memory = 268,435,456") as caught:
        _call(child, "numpy:ones", (1 << 30,))  # 8 GiB of float64
    assert caught.value.budget == "max_decoder_memory"
    assert _call(child, "numpy:ones", (1 << 20,)).shape == (1 << 20,)  # the limit was only for that call


def test_a_call_past_max_seconds_stops_the_child(child):
    pid = _call(child, "os:getpid")
    with pytest.raises(ImageError, match=r"took too long: .* exceeds the budget max_seconds = 0.5") as caught:
        _call(child, "time:sleep", 30, seconds=0.5)
    assert caught.value.budget == "max_seconds"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_errors_of_mlbench_keep_their_class_and_budget_and_others_are_named(child):
    with pytest.raises(ImageError, match="exceeds the limit of 64,000,000"):
        child.call("mlbench.image.read:read_image", (_bomb(),), {}, memory_bytes=1 << 30, seconds=30,
                   error=OptionsError, what="reading")
    with pytest.raises(ImageError, match="exceeds the budget max_decoded_bytes") as caught:
        child.call("mlbench.image.read:read_image", (_bomb(),), {"budgets": Budgets(max_pixels=10**11)},
                   memory_bytes=1 << 30, seconds=30, error=OptionsError, what="reading")
    assert caught.value.budget == "max_decoded_bytes"
    with pytest.raises(ImageError, match=r"the call failed in its child process \(ZeroDivisionError"):
        _call(child, "operator:truediv", 1, 0)


def test_warnings_raised_in_the_child_are_raised_here(child):
    with pytest.warns(UserWarning, match="from the child"):
        _call(child, "warnings:warn", "from the child")


def test_check_image_isolates_by_default_and_reports_a_memory_refusal(tmp_path):
    path = tmp_path / "wide.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 200, (2048, 2048), dtype=np.uint16))
    report = mb.check_image(path, budgets=Budgets(max_decoder_memory=1 << 20))
    assert not report.ok and report.problems[0].code == "too_large"
    assert "max_decoder_memory" in report.problems[0].message
    assert mb.check_image(path).ok


def test_the_environment_variable_isolates_every_read(monkeypatch, tmp_path):
    monkeypatch.setenv("MLBENCH_ISOLATE_DECODERS", "1")
    assert isolate_default()
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((1024, 1024), np.float64))
    with pytest.raises(ImageError, match="max_decoder_memory"):
        mb.read_image(tmp_path / "a.tif", budgets=Budgets(max_decoder_memory=1 << 20))
    monkeypatch.setenv("MLBENCH_ISOLATE_DECODERS", "sometimes")
    with pytest.raises(OptionsError, match="MLBENCH_ISOLATE_DECODERS='sometimes' is not a yes or no"):
        isolate_default()


def test_the_child_ends_with_its_parent():
    """A parent killed with SIGKILL takes its decoding child with it (PDEATHSIG, a watchdog, EOF on stdin)."""
    script = ("import os, sys; from mlbench.isolation import call_isolated; from mlbench.errors import ImageError\n"
              "print(call_isolated('os:getpid', memory_bytes=1 << 28, seconds=30, error=ImageError, what='pid'), "
              "flush=True)\nos.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    pid = int(done.stdout.split()[0])
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        __import__("time").sleep(0.1)
    raise AssertionError(f"the child {pid} outlived its parent")


def _bomb() -> bytes:
    """A PNG header announcing 100000 x 100000 pixels."""
    import struct
    import zlib

    body = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + body
            + struct.pack(">I", zlib.crc32(b"IHDR" + body)))


def test_call_isolated_is_the_shared_child():
    assert call_isolated("math:hypot", (6, 8), memory_bytes=1 << 28, seconds=30, error=ImageError, what="h") == 10.0


def test_a_forked_process_starts_its_own_child():
    """A process forked after the shared child started (a sweep's worker) must not talk to its parent's child."""
    parent_child = call_isolated("os:getpid", memory_bytes=1 << 28, seconds=30, error=ImageError, what="pid")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the forked process: its own child, then report it
        try:
            found = call_isolated("os:getpid", memory_bytes=1 << 28, seconds=30, error=ImageError, what="pid")
            os.write(write, str(found).encode())
        finally:
            os._exit(0)
    os.close(write)
    forked_child = int(os.read(read, 64) or b"0")
    os.waitpid(pid, 0)
    assert forked_child not in (0, parent_child)
    assert call_isolated("os:getpid", memory_bytes=1 << 28, seconds=30, error=ImageError, what="pid") == parent_child
