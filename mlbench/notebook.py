"""``mb.setup_notebook()``: the first call of every notebook (seeds, torch threads, ``%load_ext mlbench``).

One line instead of a ``torch.manual_seed(0)`` and a ``torch.set_num_threads(2)`` pinned in each
notebook: the seeds make a notebook's numbers repeatable, the thread count follows the machine the
notebook runs on (its usable cores, or ``OMP_NUM_THREADS`` when that is set, or what the caller
asks for), and under IPython the mlbench extension explains every failing cell.
"""

from __future__ import annotations

import os
import random
from typing import Any

__all__ = ["setup_notebook", "usable_cores"]

THREADS_ENV = "OMP_NUM_THREADS"
"""The environment variable that sets the thread count when ``threads`` is not given (the OpenMP convention)."""


def usable_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (containers, ``taskset``), else ``os.cpu_count()``.

    >>> usable_cores() >= 1
    True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # macOS and Windows have no affinity call
        return max(1, os.cpu_count() or 1)


def _threads_wanted(threads: int | None) -> tuple[int, str]:
    """``(count, why)``: the argument, else a valid ``OMP_NUM_THREADS``, else the usable cores."""
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a positive int or None (the machine's usable cores), got {threads!r}")
        return threads, "asked for"
    setting = os.environ.get(THREADS_ENV, "").strip()
    if setting.isdigit() and int(setting) >= 1:
        return int(setting), f"{THREADS_ENV}={setting}"
    cores = usable_cores()
    return cores, f"the {cores} usable core{'s' if cores != 1 else ''}"


def _ipython() -> Any:
    """The running IPython shell, or None (plain Python, or IPython not installed)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def setup_notebook(seed: int | None = 0, threads: int | None = None) -> str:
    """Seed the random generators, set torch's CPU threads and load the ``mlbench`` IPython extension.

    Parameters
    ----------
    seed : int or None
        Seeds torch (CPU and CUDA), numpy's global generator and Python's ``random``; None leaves them.
    threads : int or None
        Torch's intra-op CPU threads. None: ``OMP_NUM_THREADS`` when it is set to a positive integer,
        else the cores this process may use (:func:`usable_cores`, which respects container and
        ``taskset`` limits, unlike ``os.cpu_count()``).

    Returns
    -------
    str
        One line saying what was set, e.g. ``"seed 0 (torch, numpy, random); torch 2.4.1: 2 threads
        (the 2 usable cores); %load_ext mlbench"``. It names the machine's thread count, so a tested
        notebook should not print it (its saved output would differ on another machine).

    Raises
    ------
    ValueError
        When ``threads`` is not a positive integer or None.

    Examples
    --------
    In a notebook's first cell (the line is kept, not printed: see Returns)::

        import mlbench as mb
        setup = mb.setup_notebook(seed=0)      # or threads=4, or OMP_NUM_THREADS=4 in the environment

    Outside IPython nothing is loaded (here the thread count is left as it is):

    >>> import torch
    >>> setup_notebook(seed=None, threads=torch.get_num_threads()).startswith("not seeded; torch ")
    True
    """
    import numpy as np
    import torch

    count, why = _threads_wanted(threads)
    parts = []
    if seed is not None:
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)  # also seeds every CUDA device
        parts.append(f"seed {seed} (torch, numpy, random)")
    else:
        parts.append("not seeded")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    parts.append(f"torch {torch.__version__}: {count} thread{'s' if count != 1 else ''} ({why})")
    shell = _ipython()
    if shell is not None:
        shell.extension_manager.load_extension("mlbench")  # "already loaded" is no error: re-running the cell is fine
        parts.append("%load_ext mlbench")
    return "; ".join(parts)
