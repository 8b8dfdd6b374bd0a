"""How do the readers stand up to hostile files? Per family: tries, clean, wrong error, crash, hang, over budget.

Builds the hostile corpus of ``tests/hostile_*.py`` (checkpoints and images: deep and bomb
pickles, zip bombs, tensor floods, code-running globals in every opcode form, FIFOs and device
links, image bombs, headers announcing rows the data lacks, TIFF fields no decoder expects) and
probes every file with the public API in a child process limited to 3 GiB of address space.
``clean``: refused with ``WeightsError``/``ImageError`` (or a report with ``ok`` False) naming the
budget or the defect, no payload ran, under 10 s and 900 MB; ``wrong error``: accepted, or another
exception or message; ``crash``: the child died; ``hang``: past the timeout; ``over budget``: out of
memory, or over the time or memory allowed. Target: every try clean.

Case files (family ``cases``, built by ``tests/hostile_cases.py`` from one good saved case):
edited files and manifests, an emptied file list, unlisted files, symlinks and FIFOs in a case
folder, symlink, ``..``, absolute, backslash, drive-letter and duplicate zip entries, zip bombs and
members lying about their size, garbage, non-UTF-8 and deeply nested ``case.json``, option values
nothing allowed (``input_size`` 8192, a negative threshold, wrong types), a model named by a path,
npz and image bombs, and a replay whose forward would need 9 GiB. ``clean``: ``load_case`` raised
``CaseError`` with the pattern's message (and ``replay=False`` raised ``CaseError`` or loaded).

    python bench/hostile.py [--families deep_pickle zip_bomb ...] [--verbose]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from hostile_run import FAMILIES, OUTCOMES, run_family  # noqa: E402


def run(family: str, folder: Path) -> list[dict]:
    """Every variant of ``family``: one child for the family, then one per variant after a crash or hang."""
    if family in OWN_FAMILIES:  # issue 20's families: see their block below
        return run_own(family, folder / family)
    results = run_family(family, folder / family)
    done = {r["variant"] for r in results}
    if results and results[-1]["outcome"] in ("crash", "hang"):
        for name in FAMILIES[family][0]():
            if name not in done:
                results += run_family(family, folder / f"{family}-{name}", only=name, timeout=60)
    return results


# ---- families "triage" and "sweep-resume" (issue 20) -------------------------------------------------
# Not files a reader must refuse, but inputs that must be handled in bounded time and lose nothing.
# "triage": each pathological log of bench/triage_speed.py at 1 MB, and logs over max_triage_bytes;
# clean = the CUDA error on the last line found at its line number (with the budget's note when the
# log is over it) in under OWN_SECONDS. "sweep-resume": a finished rows file with each kind of bad
# line, or a torn last line; clean = the resume keeps every row once, moves each bad line to
# <rows>.rejected once, writes no row onto a broken line, and a second resume changes nothing.
# Each family runs in one child (python bench/hostile.py --own-child FAMILY FOLDER [VARIANT]).
OWN_FAMILIES = ("triage", "sweep-resume")
OWN_SECONDS = 10.0
_BAD_ROWS = {"empty_object": b"{}", "null": b"null", "number": b"42", "list": b"[]", "string": b'"row"',
             "key_not_text": b'{"key": 1, "image": "a.png", "model": "m", "status": "ok"}',
             "unknown_status": b'{"key": "k", "image": "a.png", "model": "m", "status": "done"}',
             "not_utf8": b'{"key": "\xff\xfe", "status": "ok"}', "not_json": b'{"key": "abc", "sta', "nested": b"[" * 100_000,
             "nul_bytes": b"\x00" * 64, "huge_line": b'{"key": "' + b"k" * 5_000_000 + b'"}'}


class _Wrong(Exception):
    """The input was handled, but not as it must be (see the family's notes)."""


def _triage_variants() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from triage_speed import LAST_LINE, LOGS

    def probe(data: bytes, limit: int | None = None) -> str:
        import os

        from mlbench.failures import triage

        if limit:
            os.environ["MLBENCH_MAX_TRIAGE_BYTES"] = str(limit)
        try:
            found = triage(data.decode("utf-8", "surrogateescape"), casebook=False)
        finally:
            os.environ.pop("MLBENCH_MAX_TRIAGE_BYTES", None)
        lines, last = [(d.failure_class, d.line) for d in found.all], data.count(b"\n")
        if ("cuda_oom", last) not in lines:
            raise _Wrong(f"the last line's CUDA error was not found at line {last}: {lines[:4]}")
        if limit and "max_triage_bytes" not in found.input_note:
            raise _Wrong(f"over the budget without a note: {found.input_note!r}")
        return found.input_note or "found"

    variants = {name: (lambda make: lambda: probe(make(1_000_000)))(make) for name, make in LOGS.items()}
    variants["over_budget"] = lambda: probe(LOGS["service_log"](5_000_000), limit=1_000_000)
    variants["over_budget_one_line"] = lambda: probe(b"x" * 5_000_000 + b"\n" + LAST_LINE, limit=1_000_000)
    return variants


def _sweep_resume_variants(folder: Path) -> dict:
    import warnings

    import numpy as np
    from PIL import Image

    from mlbench.studies._sweep import sweep

    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((64, 64)) * 255).astype(np.uint8)).save(images / f"im{i}.png")
    run = lambda out, **kw: sweep(images, ["cbam_resunet"], weights="untrained", progress=False, out=out,  # noqa: E731
                                  options={"input_size": 64}, **kw)
    run(folder / "done.jsonl")
    good = (folder / "done.jsonl").read_bytes().splitlines()

    def probe(name: str, damaged: bytes, bad: list[bytes]) -> str:
        import base64
        import json

        out = folder / name / "rows.jsonl"
        out.parent.mkdir()
        out.write_bytes(damaged)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            run(out)
        rows = [json.loads(line) for line in out.read_bytes().splitlines()]
        if sorted(r["image"] for r in rows) != ["im0.png", "im1.png", "im2.png"] or not out.read_bytes().endswith(b"\n"):
            raise _Wrong(f"rows after the resume: {[r.get('image') for r in rows]}")
        side = Path(f"{out}.rejected")
        kept = [json.loads(line) for line in side.read_text().splitlines()] if side.exists() else []
        raw = [base64.b64decode(r["base64"]) if "base64" in r else r["text"].encode() for r in kept]
        if raw != bad:
            raise _Wrong(f"set aside {len(raw)} line(s), expected {len(bad)}")
        before = (out.read_bytes(), side.read_bytes() if side.exists() else b"")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            run(out)
        if (out.read_bytes(), side.read_bytes() if side.exists() else b"") != before:
            raise _Wrong("a second resume changed the files")
        return f"{len(bad)} line(s) set aside"

    variants = {name: (lambda name, bad: lambda: probe(name, b"\n".join([good[0], bad, good[1]]) + b"\n", [bad]))(name, bad)
                for name, bad in _BAD_ROWS.items()}
    variants["torn_last_line"] = lambda: probe("torn_last_line", b"\n".join(good[:2]) + b"\n" + good[2][:40], [good[2][:40]])
    variants["row_without_newline"] = lambda: probe("row_without_newline", b"\n".join(good), [])
    return variants


def _own_child(family: str, folder: Path, only: str | None) -> None:
    """Run the variants of one of :data:`OWN_FAMILIES`, one JSON line each (the protocol of tests/hostile_run.py)."""
    import json
    import time

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    variants = _triage_variants() if family == "triage" else _sweep_resume_variants(folder)
    for name, probe in variants.items():
        if only not in (None, name):
            continue
        print(json.dumps({"variant": name, "outcome": "started"}), flush=True)
        started = time.monotonic()
        try:
            detail, outcome = probe(), "clean"
        except _Wrong as exc:
            detail, outcome = str(exc), "wrong error"
        except Exception as exc:  # any other failure is a wrong answer too, said with its type
            detail, outcome = f"{type(exc).__name__}: {exc}"[:300], "wrong error"
        seconds = time.monotonic() - started
        if outcome == "clean" and seconds > OWN_SECONDS:
            outcome, detail = "over budget", f"{seconds:.1f} s (allowed {OWN_SECONDS:.0f} s)"
        print(json.dumps({"variant": name, "outcome": outcome, "detail": detail, "seconds": round(seconds, 2)}), flush=True)


def run_own(family: str, folder: Path, only: str | None = None, timeout: float = 600) -> list[dict]:
    """Every variant of one of :data:`OWN_FAMILIES` in a child process; crashes and hangs included."""
    import json
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--own-child", family, str(folder)] + ([only] if only else [])
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        out, end = done.stdout, ("crash", f"exit {done.returncode}: {done.stderr[-600:]}")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        end = ("hang", f"still running after {timeout} s")
    results, started = [], None
    for line in out.splitlines():
        record = json.loads(line)
        started = record["variant"] if record["outcome"] == "started" else None
        if record["outcome"] != "started":
            results.append(record)
    if started is not None:
        results.append({"variant": started, "outcome": end[0], "detail": end[1], "seconds": None})
    return results
# ---- end of the families "triage" and "sweep-resume" ----------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=sorted(FAMILIES) + list(OWN_FAMILIES),
                        choices=sorted(FAMILIES) + list(OWN_FAMILIES))
    parser.add_argument("--own-child", nargs="+", help=argparse.SUPPRESS)  # FAMILY FOLDER [VARIANT]: one of OWN_FAMILIES
    parser.add_argument("--verbose", action="store_true", help="one line per try that is not clean")
    args = parser.parse_args(argv)
    if args.own_child:
        _own_child(args.own_child[0], Path(args.own_child[1]), (args.own_child[2:] or [None])[0])
        return 0
    print(f"{'family':<14} {'tries':>5} " + " ".join(f"{o:>11}" for o in OUTCOMES))
    total = dict.fromkeys(OUTCOMES, 0)
    with tempfile.TemporaryDirectory() as folder:
        for family in args.families:
            results = run(family, Path(folder))
            counts = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
            total = {o: total[o] + counts[o] for o in OUTCOMES}
            print(f"{family:<14} {len(results):>5} " + " ".join(f"{counts[o]:>11}" for o in OUTCOMES), flush=True)
            for r in results if args.verbose else ():
                if r["outcome"] != "clean":
                    print(f"    {r['variant']}: {r['outcome']}: {r['detail'][:200]}")
    print(f"{'all':<14} {sum(total.values()):>5} " + " ".join(f"{total[o]:>11}" for o in OUTCOMES))
    return int(total["clean"] != sum(total.values()))


if __name__ == "__main__":
    sys.exit(main())
