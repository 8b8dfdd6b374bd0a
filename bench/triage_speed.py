"""How fast is ``mlbench triage`` on normal and pathological logs? Seconds per MB, and the target.

Each log ends with the real error (``RuntimeError: CUDA out of memory ...``) on its last line, so
every row also checks that the whole log was considered (``found``: ``cuda_oom`` among the diagnoses). The
pathological logs are the inputs that made the old rule base backtrack: one line without newlines,
long words full of ``Error``, digit runs, lines dense with the words of the line-gap rules, blank
runs, flattened frames, and logs where every line is a different error (short ones: the most
blocks; long ones: the most rule work).
Each log is diagnosed in a child process (a timeout is a result, not a hang of the bench), at
1 MB and 10 MB; the 10 MB / 1 MB time ratio shows the growth (10 is linear; the fixed cost of the
rules' budget makes it smaller). Target: under 2 s per 10 MB (0.2 s/MB) on a 2-core machine, and
under 2 s for any log of 10 MB or less (small logs pay a fixed cost: the rules read up to 128 KiB).

    python bench/triage_speed.py [--sizes 1 10] [--logs single_line error_words ...] [--timeout 120]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TARGET_S_PER_MB = 0.2
LAST_LINE = b"RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)\n"


def _repeat(unit: bytes, size: int, newline: bool = False) -> bytes:
    """``unit`` repeated to about ``size`` bytes (one line, or one unit a line), then the last line."""
    unit = unit + b"\n" if newline else unit
    body = unit * max(1, (size - len(LAST_LINE)) // len(unit))
    return body + (b"" if body.endswith(b"\n") else b"\n") + LAST_LINE


def _numbered(make: Callable[[int], bytes], size: int) -> bytes:
    """Lines ``make(i)`` for i = 0, 1, ... up to about ``size`` bytes, then the last line."""
    parts, total, i = [], 0, 0
    while total < size - len(LAST_LINE):
        line = make(i) + b"\n"
        parts.append(line)
        total, i = total + len(line), i + 1
    return b"".join(parts) + LAST_LINE


def _word(i: int) -> bytes:
    """A different word for each ``i`` (letters only: de-duplication ignores digits)."""
    word = b""
    while True:
        word, i = bytes([97 + i % 26]) + word, i // 26
        if not i:
            return word


def _traceback(i: int) -> bytes:
    frames = b"".join(b'  File "/srv/app/stage_%d.py", line %d, in run_%d\n    x = stage_%d(x)\n' % (k, i, k, k)
                      for k in range(i % 7, i % 7 + 5))
    return b"Traceback (most recent call last):\n" + frames + b"ValueError: bad value in field %s" % _word(i)


LOGS: dict[str, Callable[[int], bytes]] = {
    # normal logs
    "service_log": lambda n: _numbered(lambda i: b"2024-05-01 12:00:%02d,123 INFO worker-%d processed request id=%d in "
                                                b"0.031 seconds status=200 OK" % (i % 60, i % 4, i), n),
    "tracebacks": lambda n: _numbered(lambda i: b"2024-05-01 12:00:00 ERROR request %d failed\n" % i + _traceback(i), n),
    "json_records": lambda n: _numbered(lambda i: json.dumps(
        {"time": "2024-05-01T12:00:00Z", "level": "error" if i % 50 == 0 else "info", "msg": f"request {i}",
         **({"exc_info": _traceback(i).decode()} if i % 50 == 0 else {})}).encode(), n),
    # pathological logs
    "single_line": lambda n: _repeat(b"a", n),
    "error_words": lambda n: _repeat(b"AError", n),
    "digit_run": lambda n: _repeat(b"1", n),
    "gap_rule_words": lambda n: _repeat(b"error download weights checkpoint state_dict mismatch ", n),
    "blank_runs": lambda n: _repeat(b" " * 200, n, newline=True),
    "flat_frames": lambda n: _repeat(b'File "a.py", line 1, in f x = g() ', n),
    "tiny_errors": lambda n: _numbered(lambda i: b"error %s" % _word(i), n),
    "distinct_errors": lambda n: _numbered(lambda i: b"ERROR in %s: RuntimeError: CUDA error: out of memory while loading "
                                                    b"weights.pth (Tried to allocate many bytes) timed out 504 Gateway" % _word(i), n),
}


def _child(path: str) -> None:
    """Diagnose one log file; print seconds and the class on one JSON line."""
    sys.path.insert(0, str(ROOT))
    from mlbench.failures import triage

    started = time.perf_counter()
    found = triage(Path(path), casebook=False)
    seconds = time.perf_counter() - started
    last = "cuda_oom" if any(d.failure_class == "cuda_oom" for d in found.all) else found.failure_class
    print(json.dumps({"seconds": seconds, "class": last, "note": found.input_note}))


def measure(name: str, megabytes: float, folder: Path, timeout: float) -> dict:
    """Seconds to triage log ``name`` of ``megabytes`` MB in a child process (None past ``timeout``)."""
    path = folder / f"{name}_{megabytes}.log"
    path.write_bytes(LOGS[name](int(megabytes * 1_000_000)))
    try:
        done = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"seconds": None, "class": f"timeout after {timeout:.0f} s", "note": ""}
    finally:
        path.unlink()
    if done.returncode:
        return {"seconds": None, "class": f"exit {done.returncode}: {done.stderr[-200:]}", "note": ""}
    return json.loads(done.stdout.splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1, 10], help="log sizes in MB")
    parser.add_argument("--logs", nargs="+", default=list(LOGS), choices=list(LOGS))
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child)
        return 0
    print(f"target: under {TARGET_S_PER_MB} s/MB ({TARGET_S_PER_MB * 10:.0f} s per 10 MB); each log ends with a CUDA "
          "out-of-memory error that must be found")
    print(f"{'log':<16}" + "".join(f"{f'{size:g} MB s/MB':>14}" for size in args.sizes) + f"{'ratio':>8}  found")
    worst_rate, worst_time = 0.0, 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name in args.logs:
            results = [measure(name, size, Path(folder), args.timeout) for size in args.sizes]
            times = [r["seconds"] if r["seconds"] is not None and r["class"] == "cuda_oom" else float("inf") for r in results]
            per_mb = [t / size for t, size in zip(times, args.sizes)]
            cells = "".join(f"{p:>14.3f}" if p != float("inf") else f"{'-':>14}" for p in per_mb)
            ratio = f"{times[-1] / times[0]:>8.1f}" if len(times) > 1 and 0 < times[0] < float("inf") else f"{'-':>8}"
            print(f"{name:<16}{cells}{ratio}  {', '.join(sorted({r['class'] for r in results}))}", flush=True)
            worst_rate = max([worst_rate] + [p for p, size in zip(per_mb, args.sizes) if size >= 10])
            worst_time = max([worst_time] + [t for t, size in zip(times, args.sizes) if size <= 10])
    met = worst_rate <= TARGET_S_PER_MB and worst_time <= 10 * TARGET_S_PER_MB
    print(f"worst: {worst_rate:.3f} s/MB at 10 MB and more, {worst_time:.2f} s for a log of 10 MB or less; target "
          f"{TARGET_S_PER_MB} s/MB and {10 * TARGET_S_PER_MB:.0f} s: {'met' if met else 'NOT met'}")
    return int(not met)


if __name__ == "__main__":
    sys.exit(main())
