"""``mlbench golden record | check | bisect``: golden outputs from the command line.

Exit status: ``record`` 0 once written; ``check`` 0 when every image is within tolerance, 1 when
one moved; ``bisect`` 0 when it names the first version that moves the outputs, 1 when it cannot
(the lower bound already moves, the upper bound does not, or untested versions hide it); 2 for
bad arguments, as every mlbench command.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mlbench.errors import OptionsError
from mlbench.pipeline.options import PRESET_NAMES, parse_option_pairs
from mlbench.models.cards import card_fields_from_text
from mlbench.studies.golden import golden_check, golden_record
from mlbench.studies.golden_bisect import golden_bisect
from mlbench.studies.golden_envs import INSTALLERS
from mlbench.studies.golden_report import ATOL, MAX_POLYGON_DELTA, MIN_IOU, RTOL

__all__ = ["add_golden_command"]

_MODEL_HELP = ("a bundled name (hrnet, cbam_resunet, ma_resunet), a checkpoint path, the architecture --weights must "
               "be, or your own model's factory 'package.module:callable' or 'path/file.py:callable' returning an nn.Module")


def _model_arguments(parser: argparse.ArgumentParser, check: bool) -> None:
    recorded = " (default: the recorded one)" if check else ""
    parser.add_argument("--model", help=_MODEL_HELP + recorded)
    parser.add_argument("--weights", metavar="PATH", help="checkpoint file (.pth, .pt, .safetensors) loaded into "
                        "--model (an architecture or a factory), or alone: architecture read from its tensors" + recorded)
    parser.add_argument("--card", metavar="JSON", help="card fields as a JSON object or @file.json, e.g. "
                        "'{\"input_size\": 256}' (fields: see mb.ModelCard)" + recorded)
    parser.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                        help="pipeline option, e.g. interpolation=lanczos (repeatable)"
                        + (" over the recorded ones" if check else ""))
    parser.add_argument("--package", action="append", default=[], metavar="DIST",
                        help="also record this distribution's version in the environment (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON")


def _tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--atol", type=float, default=ATOL, help=f"logits move when |new - golden| > atol + rtol*|golden| "
                        f"anywhere, compared in float16 (default {ATOL})")
    parser.add_argument("--rtol", type=float, default=RTOL, help=f"see --atol (default {RTOL})")
    parser.add_argument("--min-iou", type=float, default=MIN_IOU, help=f"masks move below this IoU (default {MIN_IOU})")
    parser.add_argument("--max-polygon-delta", type=int, default=MAX_POLYGON_DELTA,
                        help=f"polygon counts move when they change by more (default {MAX_POLYGON_DELTA})")


def add_golden_command(sub) -> None:
    """Register ``mlbench golden record|check|bisect``."""
    p = sub.add_parser("golden", help="record a model's outputs on images, check them later, bisect a package's "
                       "versions for the one that moved them", description=__doc__)
    actions = p.add_subparsers(dest="golden_command", required=True, metavar="{record,check,bisect}")

    record = actions.add_parser("record", help="run the pipeline on images and store the outputs with the environment")
    _model_arguments(record, check=False)
    record.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    record.add_argument("--out", required=True, help="the golden file to write (.safetensors)")
    record.add_argument("--preset", default="fixed", choices=PRESET_NAMES)
    record.set_defaults(run=_record)

    check = actions.add_parser("check", help="run the recorded images again; exit 1 when an output moved")
    check.add_argument("golden", help="a file written by mlbench golden record")
    _model_arguments(check, check=True)
    check.add_argument("--preset", choices=PRESET_NAMES, help="default: the recorded one")
    _tolerance_arguments(check)
    check.set_defaults(run=_check)

    bisect = actions.add_parser("bisect", help="find the first version of a package that moves the outputs")
    bisect.add_argument("golden", help="a golden file recorded where the outputs were right")
    bisect.add_argument("--package", required=True, metavar="DIST", help="the distribution to vary, e.g. pillow")
    bisect.add_argument("--from", dest="lower", metavar="VERSION",
                        help="lower bound, included (expected to keep the outputs)")
    bisect.add_argument("--to", dest="upper", metavar="VERSION", help="upper bound, included (expected to move them)")
    bisect.add_argument("--versions", metavar="A,B,C", help="the versions to consider (default: what the index offers)")
    bisect.add_argument("--find-links", metavar="DIR", help="install from this folder of wheels, no index at all")
    bisect.add_argument("--installer", choices=INSTALLERS, default="auto", help="auto: uv when on the PATH, else pip")
    bisect.add_argument("--no-progress", action="store_true", help="no progress bar or per-version lines on stderr")
    bisect.add_argument("--json", action="store_true", help="print JSON")
    _tolerance_arguments(bisect)
    bisect.set_defaults(run=_bisect)


def read_card_fields(text: str | None) -> dict[str, Any] | None:
    """``--card``: a JSON object, or ``@file.json``; None without it.

    Raises
    ------
    OptionsError
        A missing file, or text that is not a JSON object.
    """
    return None if text is None else card_fields_from_text(text)


def _tolerance(args: argparse.Namespace) -> dict[str, Any]:
    return {"atol": args.atol, "rtol": args.rtol, "min_iou": args.min_iou, "max_polygon_delta": args.max_polygon_delta}


def _show(result, as_json: bool) -> None:
    print(json.dumps(result.to_dict(), indent=1, default=str) if as_json else result.text())


def _record(args: argparse.Namespace) -> int:
    golden = golden_record(args.model, args.images, args.out, weights=args.weights, card=read_card_fields(args.card),
                           preset=args.preset, options=parse_option_pairs(args.option), packages=args.package)
    _show(golden, args.json)
    return 0


def _check(args: argparse.Namespace) -> int:
    report = golden_check(args.golden, model=args.model, weights=args.weights, card=read_card_fields(args.card),
                          preset=args.preset, options=parse_option_pairs(args.option), packages=args.package,
                          **_tolerance(args))
    _show(report, args.json)
    return 0 if report.ok else 1


def _bisect(args: argparse.Namespace) -> int:
    versions = [v.strip() for v in args.versions.split(",") if v.strip()] if args.versions else None
    report = golden_bisect(args.golden, args.package, args.lower, args.upper, versions=versions,
                           find_links=args.find_links, installer=args.installer, progress=not args.no_progress,
                           **_tolerance(args))
    _show(report, args.json)
    return 0 if report.found else 1
