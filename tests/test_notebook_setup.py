"""``mb.setup_notebook``: seeds, torch threads that follow the machine (or the caller), ``%load_ext mlbench``."""

from __future__ import annotations

import os
import random

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

import mlbench as mb
from mlbench.notebook import THREADS_ENV, setup_notebook, usable_cores


@pytest.fixture
def restore_torch_state():
    """The process's thread count and RNG state as before the test (other tests share this process)."""
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    np_state, py_state = np.random.get_state(), random.getstate()
    yield
    torch.set_num_threads(threads)
    torch.random.set_rng_state(rng)
    np.random.set_state(np_state)
    random.setstate(py_state)


def test_it_is_public_and_usable_cores_follow_the_affinity_mask():
    assert mb.setup_notebook is setup_notebook and "setup_notebook" in mb.__all__
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert usable_cores() == expected


def test_seed_makes_torch_numpy_and_random_repeatable(restore_torch_state):
    setup_notebook(seed=3, threads=1)
    first = (torch.rand(3), np.random.rand(3), random.random())
    setup_notebook(seed=3, threads=1)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_threads_follow_the_machine_the_environment_or_the_argument(restore_torch_state, monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    line = setup_notebook(seed=0)
    assert torch.get_num_threads() == usable_cores()
    assert line.startswith("seed 0 (torch, numpy, random); torch ")
    assert f"{usable_cores()} thread" in line and "usable core" in line
    assert "%load_ext" not in line  # no IPython shell here
    monkeypatch.setenv(THREADS_ENV, "1")
    assert "1 thread (OMP_NUM_THREADS=1)" in setup_notebook(seed=None)
    assert torch.get_num_threads() == 1
    monkeypatch.setenv(THREADS_ENV, "not a number")  # ignored: the usable cores
    assert "usable core" in setup_notebook(seed=None)
    assert "2 threads (asked for)" in setup_notebook(seed=None, threads=2)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_a_bad_thread_count_is_refused(threads):
    with pytest.raises(ValueError, match="threads must be a positive int"):
        setup_notebook(threads=threads)


def test_in_a_kernel_it_loads_the_extension_once_and_sets_the_threads():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in (
        "import torch\nimport mlbench as mb\nline = mb.setup_notebook(seed=0, threads=1)\nprint(line)",
        "print(mb.setup_notebook(seed=0, threads=1))\nprint(torch.get_num_threads())",  # re-running the cell is fine
        "1 / 0",
    )])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    first, second, failing = (cell.outputs for cell in nb.cells)
    assert first[0].text.rstrip().endswith("1 thread (asked for); %load_ext mlbench")
    assert second[0].text.splitlines()[-1] == "1"
    shown = [o for o in failing if o.output_type == "display_data"]
    assert shown and shown[0].data["text/plain"].startswith("mlbench triage:")  # the extension explains the error
    assert failing[-1].output_type == "error" and failing[-1].ename == "ZeroDivisionError"
