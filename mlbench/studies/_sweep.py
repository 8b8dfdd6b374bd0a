"""``mb.sweep``: which of these images break, with which model, and why?

One row per (image, model, preset) in a pandas DataFrame: status (ok / failed / timeout /
crashed), the triaged failure class, the image report's problems, seconds per stage, memory,
polygon count and, where a ground-truth mask exists, pixel and object scores. Rows are
appended to ``out`` (JSON lines) as they finish, and a re-run skips every row already there,
keyed by image content hash, model, weights sha256, preset and options; a damaged rows file
(torn last line, lines that are not rows) is repaired first, the bad lines kept aside in
``<out>.rejected`` (:mod:`mlbench.studies._sweep_rows`). The work runs serially, in any
:class:`concurrent.futures.Executor` (a process pool; :func:`~mlbench.studies.executors.process_pool`
gives one whose workers die with the sweep), or on Dask (:func:`mlbench.sweep_executor`); see
:mod:`mlbench.studies.executors` for the worker side.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
from tqdm.auto import tqdm

from mlbench.errors import OptionsError
from mlbench.pipeline.options import PRESET_NAMES, make_options, parse_option_pairs
from mlbench.pipeline.stages import STAGE_NAMES
from mlbench.paths import sha256_file
from mlbench.studies._sweep_rows import read_rows as _read_rows
from mlbench.studies._sweep_rows import repair_rows
from mlbench.studies.executors import CrashIf, SweepTask, run_tasks, sweep_executor

__all__ = ["sweep", "sweep_executor", "sweep_tasks", "sweep_run", "read_rows", "CrashIf", "add_sweep_command"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
TRUTH_SUFFIX = "_mask"
COLUMNS = ("image", "model", "preset", "status", "stage", "failure_class", "error_type", "error", "problems",
           "shape", "bit_depth", "n_polygons", *(f"t_{s}" for s in STAGE_NAMES), "t_total", "rss_delta_mb",
           "worker_peak_rss_mb", "iou", "dice", "precision", "recall", "f1", "pq", "n_true", "n_pred",
           "metrics_error", "options", "image_sha", "weights_sha", "path", "key", "worker", "resumed")


def list_images(images: str | Path | Iterable[str | Path]) -> list[Path]:
    """Image files of a folder (sorted; ``*_mask.*`` ground-truth files left out), or the given paths."""
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        return sorted(p for p in Path(images).iterdir()
                      if p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(TRUTH_SUFFIX))
    if isinstance(images, (str, Path)):
        raise OptionsError(f"images={str(images)!r} is not a folder; pass a folder or a list of image paths")
    return [Path(p) for p in images]


def _truth_for(path: Path, truth: dict | Callable | None) -> str | None:
    """Ground truth of an image: ``truth[name]``, ``truth(path)``, or a sibling ``<stem>_mask.*``."""
    if callable(truth):
        found = truth(path)
    elif truth is not None:
        found = truth.get(path.name, truth.get(str(path)))
    else:
        found = next((p for p in sorted(path.parent.glob(path.stem + TRUTH_SUFFIX + ".*"))), None)
    return None if found is None else str(found)


def _weights_sha(model: str, weights: str) -> str:
    if weights == "untrained":
        return "untrained-seed0"
    from mlbench.models import resolve_name
    from mlbench.models.loading import load_manifest

    return load_manifest()["models"][resolve_name(model)]["sha256"]


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _model_entry(model: Any, weights: str) -> tuple[str, str, str, dict[str, Any]]:
    """(name in the rows, what a worker loads, weights sha256, the user's card fields) of a name, or of a
    model loaded by :func:`mlbench.load_model` from a checkpoint or a bundled name (workers reload it)."""
    if isinstance(model, str):
        return model, "", _weights_sha(model, weights), {}
    from mlbench.models.cards import card

    found = card(model)  # anything but an nn.Module is refused here
    source = found.source if Path(found.source).is_file() else \
        found.architecture if found.source.startswith("bundled") else ""
    if not source or weights != "trained":
        raise OptionsError(f"sweep runs names, or models from mb.load_model (a checkpoint file or a bundled name) "
                           f"with weights='trained', which each worker loads again; {found.name!r} comes from "
                           f"{found.source or 'no file'!r} with weights={weights!r}: save it (torch.save) and pass "
                           "mb.load_model(path), or pass a name")
    return found.name, source, found.sha256, {k: getattr(found, k) for k, o in found.origins.items() if o == "user"}


def sweep_tasks(images, models: Sequence[Any], presets: Sequence[str] = ("fixed",), *, options: dict | None = None,
                weights: str = "trained", truth=None, timeout: float | None = None,
                hook: Callable | None = None) -> list[SweepTask]:
    """The tasks a :func:`sweep` runs, image-major, each with its resume key (see :func:`sweep`)."""
    if weights not in ("trained", "untrained"):
        raise OptionsError(f"weights={weights!r}; expected 'trained' (bundled weights) or 'untrained'")
    if isinstance(models, str):
        models = [models]
    options = dict(options or {})
    for preset in presets:
        make_options(preset, **options)  # unknown presets and options fail here, before any work
    entries = [_model_entry(m, weights) for m in models]
    tasks = []
    for path in list_images(images):
        image_sha = sha256_file(path) if path.is_file() else "missing:" + str(path)
        gt = _truth_for(path, truth)
        for name, source, sha, fields in entries:
            for preset in presets:
                key = _key(image_sha, name, sha, preset, options, *([fields] if fields else []))
                tasks.append(SweepTask(key, str(path), path.name, image_sha, name, weights, sha, preset,
                                       options, gt, timeout, hook, source, fields))
    return tasks


def read_rows(out: str | Path) -> dict[str, dict]:
    """Rows already written to a sweep's JSON-lines file (for a ``.parquet`` name, the ``.jsonl`` beside
    it), by key; lines that are not rows and a torn last line are left out (read only)."""
    return _read_rows(_jsonl(out))


def _jsonl(out: str | Path) -> Path:
    path = Path(out)
    return path.with_suffix(".jsonl") if path.suffix == ".parquet" else path


def _frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    for column in COLUMNS:
        if column not in frame:
            frame[column] = None
    return frame[list(COLUMNS)].reset_index(drop=True)


def sweep(images, models: Sequence[str], presets: Sequence[str] = ("fixed",), executor: Executor | None = None,
          out: str | Path | None = None, *, options: dict | None = None, weights: str = "trained", truth=None,
          timeout: float | None = None, progress: bool = True, resume: bool = True,
          hook: Callable | None = None) -> pd.DataFrame:
    """Segment every image with every model and preset; one row per combination.

    Parameters
    ----------
    images : folder or list of paths
        A folder's image files (ground truth ``<stem>_mask.*`` beside them is used, not swept).
    models : list of str or nn.Module
        Model names (``hrnet``, ``cbam_resunet``, ``ma_resunet``), or models from :func:`mlbench.load_model`
        (a checkpoint file or a bundled name, with its card; rows name it by its card); each worker
        loads each once.
    presets : list of str
        Pipeline presets (``fixed``, ``as_served``).
    executor : concurrent.futures.Executor, optional
        None runs here, serially; a ``ProcessPoolExecutor`` isolates crashes (a crashed pool
        is replaced and the crash recorded against its image); :func:`sweep_executor` gives Dask.
    out : path, optional
        JSON-lines file, appended row by row; with a ``.parquet`` name the JSON lines go to
        the ``.jsonl`` beside it and the Parquet file is written at the end (needs pyarrow).
    options : dict
        Pipeline options for every run, e.g. ``{"resize": "none"}`` (native size).
    weights : "trained" (bundled, :func:`mlbench.load_model`) or "untrained" (seed 0).
    truth : dict name -> path, callable path -> path, or None (``<stem>_mask.*`` siblings).
    timeout : float, optional
        Seconds per task; enforced where the task runs in a process's main thread (serial,
        process pools), not in Dask's worker threads.
    progress : show a ``tqdm.auto`` progress bar with count and ETA (a widget in a notebook, text on
        stderr elsewhere); False for none.
    resume : skip tasks whose key is already in ``out``. Either way, lines of ``out`` that are not rows
        and a torn last line are first moved to ``<out>.rejected`` (with a warning), so a new row never
        lands on a broken line.
    hook : picklable callable run in the worker before each task, e.g. :class:`CrashIf`.

    Returns
    -------
    pandas.DataFrame
        One row per (image, model, preset), in image-major order; ``resumed`` marks rows read back.
    """
    tasks = sweep_tasks(images, models, presets, options=options, weights=weights, truth=truth,
                        timeout=timeout, hook=hook)
    done = repair_rows(_jsonl(out)).rows if out is not None else {}
    done = done if resume else {}
    todo = [t for t in tasks if t.key not in done]
    rows = {k: {**r, "resumed": True} for k, r in done.items()}
    bar = _progress(len(todo), progress)
    sink = _jsonl(out).open("a") if out is not None else None

    def emit(row: dict) -> None:
        rows[row["key"]] = {**row, "resumed": False}
        if sink is not None:
            sink.write(json.dumps(row, default=str) + "\n")
            sink.flush()
        _advance(bar, row)

    try:
        run_tasks(todo, executor, emit)
    finally:
        bar.close()
        if sink is not None:
            sink.close()
    frame = _frame([rows[t.key] for t in tasks])
    _write_parquet(frame, out)
    return frame


def sweep_run(row: pd.Series | dict):
    """The :class:`mlbench.Run` behind one sweep row, not yet started, e.g. for ``run.run()`` or a case file."""
    from mlbench.models import build_model
    from mlbench.pipeline.run import Pipeline
    from mlbench.models.loading import load_model

    row = dict(row)
    model = build_model(row["model"], "small").eval() if row["weights_sha"].startswith("untrained") \
        else load_model(row["model"])
    return Pipeline(model, preset=row["preset"], **json.loads(row["options"])).start(row["path"])


def _write_parquet(frame: pd.DataFrame, out: str | Path | None) -> None:
    if out is None or Path(out).suffix != ".parquet":
        return
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        print(f"pyarrow is not installed: rows are in {_jsonl(out)} only", file=sys.stderr)
        return
    frame.to_parquet(out)


def _progress(total: int, enabled: bool = True) -> tqdm:
    """A ``tqdm.auto`` bar over ``total`` tasks: count, rate and ETA; a widget in a notebook, text on stderr
    elsewhere; a no-op bar when ``enabled`` is False or there is nothing to do."""
    return tqdm(total=total, desc="sweep", unit="task", disable=not enabled or total == 0)


def _advance(bar: tqdm, row: dict) -> None:
    """One task done: the bar moves by one and shows the row's status, image and model."""
    bar.set_postfix_str(f"{row.get('status')}: {row.get('image')} {row.get('model')}", refresh=False)
    bar.update(1)


def add_sweep_command(sub) -> None:
    """Register ``mlbench sweep DIR --models ... --out ... [--executor local|processes|ADDRESS]`` (``mlbench`` adds
    ``--weights PATH`` (repeatable) and ``--card JSON``)."""
    p = sub.add_parser("sweep", help="segment every image of a folder with several models; a table of failures")
    p.add_argument("folder", help="folder of images (ground truth as <stem>_mask.* beside them)")
    p.add_argument("--models", nargs="+", default=["hrnet", "cbam_resunet", "ma_resunet"],
                   help="model names (default: all three, or none when --weights is given)")
    p.add_argument("--presets", nargs="+", default=["fixed"], choices=PRESET_NAMES)
    p.add_argument("--out", help="JSON-lines file (.parquet also writes Parquet when pyarrow is installed)")
    p.add_argument("--executor", default=None, help="processes[:N] (process pool), local (Dask LocalCluster) "
                   "or a Dask scheduler address; default: serial")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline option for every run, e.g. resize=none (repeatable)")
    p.add_argument("--untrained", action="store_true", help="untrained models (seed 0) instead of bundled weights")
    p.add_argument("--timeout", type=float, default=None, help="seconds per task")
    p.add_argument("--no-resume", action="store_true", help="re-run tasks already in --out")
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines")
    p.set_defaults(run=run_sweep)


def _cli_executor(spec: str | None, workers: int) -> Executor | None:
    if spec is None:
        return None
    return sweep_executor(spec, n_workers=workers)  # processes[:N]: a pool whose workers die with this process


def run_sweep(args: argparse.Namespace) -> int:
    """The ``mlbench sweep`` command: exit 0 when every row is ok, 1 otherwise."""
    executor = _cli_executor(args.executor, args.workers)
    try:
        frame = sweep(args.folder, args.models, args.presets, executor, args.out, options=parse_option_pairs(args.option),
                      weights="untrained" if args.untrained else "trained", timeout=args.timeout,
                      resume=not args.no_resume)
    finally:
        if executor is not None:
            getattr(executor, "client", executor).close() if hasattr(executor, "client") else executor.shutdown()
    if args.json:
        print(frame.to_json(orient="records", lines=True))
    else:
        print(pd.crosstab(frame["model"], frame["status"]).to_string())
        bad = frame[frame["status"] != "ok"]
        if len(bad):
            print(bad[["image", "model", "preset", "status", "stage", "failure_class", "error"]].to_string(index=False))
    return int((frame["status"] != "ok").any())
