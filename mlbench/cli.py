"""The ``mlbench`` command line. Every inspector prints text by default and JSON with ``--json``.

Exit status: 0 on success, 1 when the inspected thing has a problem or a stage failed,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .errors import MlbenchError, OptionsError

__all__ = ["main"]

COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def command(name: str):
    """Register ``fn(subparsers)`` that adds sub-command ``name``."""

    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


@command("segment")
def _segment_parser(sub) -> None:
    p = sub.add_parser("segment", help="segment one image and print the result or the service's JSON")
    p.add_argument("image", help="image file (PNG, JPEG, TIFF, ...)")
    p.add_argument("--model", default="hrnet", help="hrnet | cbam_resunet | ma_resunet (or a service id)")
    p.add_argument("--preset", default="fixed", choices=["fixed", "as_served"])
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--input-size", type=int, default=None, help="model input side (default: the model's own)")
    p.add_argument("--no-holes", action="store_true", help="do not detect holes (RETR_EXTERNAL)")
    p.add_argument("--json", action="store_true", help="print the service's response JSON")
    p.add_argument("--overlay", metavar="PNG", help="also write the mask over the image to this PNG")
    p.set_defaults(run=_segment)


def _segment(args) -> int:
    from .pipeline import Pipeline

    options = {"input_size": args.input_size}
    if args.threshold is not None:
        options["threshold"] = args.threshold
    if args.no_holes:
        options["detect_holes"] = False
    run = Pipeline(args.model, preset=args.preset, **options).start(args.image).run()
    if run.failed:
        error = {"success": False, "stage": run.failed_stage, "error": f"{type(run.error).__name__}: {run.error}"}
        print(json.dumps(error, indent=1) if args.json else f"FAILED at stage {run.failed_stage}: {error['error']}\n{run!r}")
        return 1
    seg = run.result()
    if args.overlay:
        from PIL import Image

        from .overlay import overlay

        Image.fromarray(overlay(run.output("decode").image, seg.mask)).save(args.overlay)
    if args.json:
        print(json.dumps(seg.response, indent=1))
    else:
        print(f"{seg!r}\n{run!r}" + (f"\noverlay written to {args.overlay}" if args.overlay else ""))
    return 0


@command("lab")
def _lab_parser(sub) -> None:
    p = sub.add_parser("lab", help="start JupyterLab on the notebooks folder (prints the URL with its token)")
    p.add_argument("--port", type=int, default=8888)
    p.set_defaults(run=_lab)


def _lab(args) -> int:
    import os
    import subprocess
    from pathlib import Path

    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={args.port}",
               f"--notebook-dir={notebooks}"] + (["--allow-root"] if hasattr(os, "getuid") and os.getuid() == 0 else [])
    return subprocess.call(command)


# Sub-commands that live beside the concept they inspect: (module, function that adds the parser).
_EXTERNAL_COMMANDS = [
    ("mlbench.imagecheck", "add_check_image_command"), ("mlbench.weights", "add_check_weights_command"),
    ("mlbench.triage", "add_triage_command"), ("mlbench.doctor", "add_doctor_command"),
    ("mlbench.report", "add_report_command"), ("mlbench.sweep", "add_sweep_command"),
    ("mlbench.compare", "add_compare_command"), ("mlbench.probes.cli", "add_memory_command"),
    ("mlbench.tile_fidelity", "add_tiles_command"),
    ("mlbench.service.cli", "add_serve_command"),
]


def _missing_extra(sub, name: str, error: ImportError) -> None:
    p = sub.add_parser(name, help=f"unavailable: {error}")
    p.set_defaults(run=lambda args: _fail(f"`mlbench {name}` needs a missing package ({error}); "
                                          "install the extra: pip install 'mlbench[service]'"))


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="mlbench", description="Debug image-segmentation inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    for module, function in _EXTERNAL_COMMANDS:
        try:
            getattr(importlib.import_module(module), function)(sub)
        except ImportError as error:  # an optional extra (fastapi for serve) is not installed
            _missing_extra(sub, "serve", error)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mlbench`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MlbenchError as exc:
        print(f"mlbench {args.command}: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, OptionsError) else 1


if __name__ == "__main__":
    sys.exit(main())
