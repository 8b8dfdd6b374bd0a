"""Hostile inputs, one test per class of defect; each family runs in a child process with a memory
limit (RLIMIT_AS) and a timeout, so a segfault, a hang or a memory blow-up fails the test instead
of taking the test run down. The corpus is built at test time (``hostile_*.py``): other files of
each kind than the ones the attack run used, several per class.

A variant passes when every public reader refuses it with ``WeightsError``/``ImageError`` (or a
report with ``ok`` False) whose message names the budget or the defect, no payload ran, and it
took under ``hostile_run.SECONDS`` and ``hostile_run.PEAK_MB``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hostile_images import RGB, _pil, _tiff, _tiff_tag
from hostile_run import FAMILIES, _limit, run_family


def _assert_clean(family: str, tmp_path) -> None:
    results = run_family(family, tmp_path)
    variants = FAMILIES[family][0]()
    bad = [f"{r['variant']}: {r['outcome']} ({r['detail']})" for r in results if r["outcome"] != "clean"]
    assert not bad, "\n".join(bad)
    assert [r["variant"] for r in results] == list(variants), "some variants did not run"


def test_deep_pickles_are_refused_without_recursion(tmp_path):
    """A tuple key nested 200,000 deep segfaulted check_weights; now max_pickle_depth refuses it, in every container."""
    _assert_clean("deep_pickle", tmp_path)


def test_pickle_bombs_stop_at_their_budgets(tmp_path):
    """Exponentially shared tuples, lists and dicts; too many opcodes, memo entries, stack entries, marks."""
    _assert_clean("pickle_bomb", tmp_path)


def test_zip_bombs_are_refused_from_the_central_directory(tmp_path):
    """Members declaring 10 GiB, members lying about their size, too many members, a bad pickle CRC."""
    _assert_clean("zip_bomb", tmp_path)


def test_tensor_counts_and_declared_storage_are_bounded(tmp_path):
    """Thousands of empty tensors (safetensors, zip, legacy); a storage declaring 8 GB; one past the file's end."""
    _assert_clean("many_tensors", tmp_path)


def test_code_running_globals_in_every_opcode_form(tmp_path):
    """GLOBAL, INST, STACK_GLOBAL (unicode, byte strings, from the memo, computed), OBJ, NEWOBJ, NEWOBJ_EX, EXT1:
    all ``code_execution``, never run, never advising weights_only=False."""
    _assert_clean("code_pickle", tmp_path)


def test_special_files_are_refused_before_opening(tmp_path):
    """FIFOs, sockets, directories and symlinks to /dev/zero, /dev/urandom, /dev/null: said as what they are."""
    _assert_clean("special_file", tmp_path)


def test_image_bombs_are_refused_from_the_header(tmp_path):
    """Float64/float32/64-sample TIFFs, a 16-bit RGBA PNG: decoded bytes, not only pixels, are budgeted."""
    _assert_clean("image_bomb", tmp_path)


def test_headers_announcing_rows_the_data_lacks(tmp_path):
    """Patched heights and widths (PNG, interlaced PNG, JPEG, TIFF strips and tiles, BMP, GIF) and zero sizes."""
    _assert_clean("image_header", tmp_path)


def test_tiff_fields_no_decoder_expects_raise_image_error(tmp_path):
    """BitsPerSample 255/0/3, SamplesPerPixel 0/200, an unknown compression, empty or missing strips ..."""
    _assert_clean("tiff_fields", tmp_path)


def test_check_image_keeps_going_over_hostile_files(tmp_path):
    """One report per file, the hostile ones with problems, the good one last; exit status 1."""
    paths = []
    for name, (data, tag, value) in {"bits.tif": (_tiff(), 258, 255), "wide.tif": (_tiff(), 256, 0)}.items():
        (tmp_path / name).write_bytes(_tiff_tag(data, tag, value))
        paths.append(tmp_path / name)
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "good.png").write_bytes(_pil(RGB, "PNG"))
    paths += [tmp_path / "pipe.png", tmp_path / "missing.png", tmp_path / "good.png"]
    done = subprocess.run([sys.executable, "-m", "mlbench.cli", "check-image", *map(str, paths)], capture_output=True,
                          text=True, timeout=120, preexec_fn=_limit)
    reports = done.stdout.split("ImageReport(")[1:]
    assert done.returncode == 1 and len(reports) == 5, done.stdout + done.stderr
    assert "BitsPerSample" in reports[0] and "empty image" in reports[1] and "is a FIFO" in reports[2]
    assert "does not exist" in reports[3] and "no problems" in reports[4]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_several_variants(family):
    assert len(FAMILIES[family][0]()) >= 5
