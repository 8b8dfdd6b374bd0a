"""How do the readers stand up to hostile files? Per family: tries, clean, wrong error, crash, hang, over budget.

Builds the hostile corpus of ``tests/hostile_*.py`` (checkpoints and images: deep and bomb
pickles, zip bombs, tensor floods, code-running globals in every opcode form, FIFOs and device
links, image bombs, headers announcing rows the data lacks, TIFF fields no decoder expects) and
probes every file with the public API in a child process limited to 3 GiB of address space.
``clean``: refused with ``WeightsError``/``ImageError`` (or a report with ``ok`` False) naming the
budget or the defect, no payload ran, under 10 s and 900 MB; ``wrong error``: accepted, or another
exception or message; ``crash``: the child died; ``hang``: past the timeout; ``over budget``: out of
memory, or over the time or memory allowed. Target: every try clean.

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
    results = run_family(family, folder / family)
    done = {r["variant"] for r in results}
    if results and results[-1]["outcome"] in ("crash", "hang"):
        for name in FAMILIES[family][0]():
            if name not in done:
                results += run_family(family, folder / f"{family}-{name}", only=name, timeout=60)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=sorted(FAMILIES), choices=sorted(FAMILIES))
    parser.add_argument("--verbose", action="store_true", help="one line per try that is not clean")
    args = parser.parse_args(argv)
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
