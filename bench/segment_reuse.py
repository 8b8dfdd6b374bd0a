"""``mb.segment(image, "name")`` against segmenting with a model already loaded, side by side in one run.

Naming a model (what the CLI, the Stepper and most notebook calls do) used to read and hash the
weights file and build the network on every call; the shared model cache
(``mlbench.models.loading.shared_model``, at most 4 models, keyed by the weights file and device,
reloaded when the file's bytes change) loads it once. What a named call still pays: a stat of the
file and a look at the model's parameter versions. Target: the named call within 1.1x of the
loaded one (the median of back-to-back pairs, order alternating, as bench/probes.py judges; one
torch thread by default, for the reason given there).

    python bench/segment_reuse.py [--repeats 15] [--threads 1] [--models cbam_resunet hrnet ma_resunet]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mlbench as mb  # noqa: E402

TARGET = 1.10


def paired_ratio(name: str, image, repeats: int) -> float:
    loaded = mb.load_model(name)
    by_name = lambda: mb.segment(image, name)  # noqa: E731
    by_model = lambda: mb.segment(image, loaded)  # noqa: E731
    by_name(), by_model()  # warm-up: the first named call loads the model
    ratios = []
    for repeat in range(repeats):
        times = {}
        for label, fn in ((("name", by_name), ("model", by_model)) if repeat % 2 == 0 else
                          (("model", by_model), ("name", by_name))):
            start = time.perf_counter()
            fn()
            times[label] = time.perf_counter() - start
        ratios.append(times["name"] / times["model"])
    return statistics.median(ratios)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=mb.list_models())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    image = mb.load_sample("spheroids_8bit").image
    ratios = {name: paired_ratio(name, image, args.repeats) for name in args.models}
    for name, ratio in ratios.items():
        print(f"{name:13s} segment(image, name) / segment(image, model): {ratio:.3f}")
    ok = all(r <= TARGET for r in ratios.values())
    print(f"target <= {TARGET}: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
