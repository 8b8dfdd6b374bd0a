"""How fast the Stepper answers: median time of Next per stage and of a threshold change.

The forward pass itself is excluded from the Next time of the forward stage (that is the
model's cost, not the widget's); everything else counts: the stage, the view (PNG
encoding, histogram, overlay) and the widget update. Target: < 300 ms each on a
512x512 sample with a small model.

    python bench/stepper.py [--model cbam_resunet] [--sample spheroids_8bit] [--repeats 5] [--untrained]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import mlbench as mb  # noqa: E402
from mlbench.pipeline.stages import STAGE_NAMES  # noqa: E402
from mlbench.widgets import Stepper  # noqa: E402

TARGET_SECONDS = 0.300
THRESHOLDS = (0.3, 0.6, 0.4, 0.7, 0.5)


def loader(untrained: bool, input_size: int):
    """Trained bundled weights when present (or ``--untrained``: a fresh small model at ``input_size``)."""
    def load(name: str) -> torch.nn.Module:
        if untrained:
            model = mb.build_model(name, "small").eval()
            return mb.attach_card(model, mb.card(model).changed(input_size=input_size))
        return mb.load_model(name)
    return load


def time_next(stepper: Stepper) -> float:
    """Wall time of one Next, minus the forward pass when that is the stage it ran."""
    started = time.perf_counter()
    stepper.next()
    elapsed = time.perf_counter() - started
    if stepper.stage == "forward":
        elapsed -= stepper.run.records["forward"].seconds
    return elapsed


def measure(stepper: Stepper, repeats: int) -> tuple[dict[str, list[float]], list[float], list[float]]:
    """Next per stage over ``repeats`` fresh runs, then threshold changes on the complete run."""
    per_stage: dict[str, list[float]] = {name: [] for name in STAGE_NAMES}
    forwards = []
    for _ in range(repeats):
        stepper.reset()
        for name in STAGE_NAMES:
            per_stage[name].append(time_next(stepper))
        forwards.append(stepper.run.records["forward"].seconds)
    thresholds = []
    for _ in range(repeats):
        for value in THRESHOLDS:
            forward = stepper.run.records["forward"]
            started = time.perf_counter()
            stepper.threshold_slider.value = value
            thresholds.append(time.perf_counter() - started)
            if stepper.run.records["forward"] is not forward:
                raise SystemExit("a threshold change re-ran the forward pass")
    return per_stage, thresholds, forwards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cbam_resunet")
    parser.add_argument("--sample", default="spheroids_8bit")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--untrained", action="store_true", help="fresh small model instead of the bundled weights")
    parser.add_argument("--input-size", type=int, default=256, help="model input side with --untrained")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    stepper = Stepper(args.model, args.sample, model_loader=loader(args.untrained, args.input_size))
    if stepper.run is None:
        raise SystemExit(f"cannot load {args.model}: {stepper.error} (try --untrained)")
    stepper.run_all()  # warm-up: imports, first PNG encoder, allocator
    per_stage, thresholds, forwards = measure(stepper, args.repeats)
    image = mb.load_sample(args.sample).image
    print(f"Stepper on {args.sample} {image.shape} with {args.model} ({'untrained' if args.untrained else 'trained'}), "
          f"{args.repeats} repeats, {args.threads} threads; target < {TARGET_SECONDS * 1000:.0f} ms")
    worst = 0.0
    for name, values in per_stage.items():
        median = statistics.median(values)
        worst = max(worst, median)
        note = " (forward pass excluded)" if name == "forward" else ""
        print(f"  Next -> {name:<12} median {median * 1000:6.1f} ms{note}")
    median = statistics.median(thresholds)
    worst = max(worst, median)
    print(f"  threshold change     median {median * 1000:6.1f} ms (postprocess + polygons + view)")
    print(f"  forward pass itself  median {statistics.median(forwards) * 1000:6.1f} ms")
    print("PASS" if worst < TARGET_SECONDS else "FAIL", f"worst median {worst * 1000:.1f} ms")
    return 0 if worst < TARGET_SECONDS else 1


if __name__ == "__main__":
    raise SystemExit(main())
