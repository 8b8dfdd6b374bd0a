"""The ``mlbench`` command line. Every inspector prints text by default and JSON with ``--json``.

Exit status: 0 on success, 1 when the inspected thing has a problem or a stage failed,
2 for bad arguments, 3 when the command cannot run here (an optional package is missing,
or the command's module failed to load).

Every command is listed whatever is installed. One whose optional extra is missing (fastapi
for ``serve``) says which extra to install when run; one whose module fails for another
reason says how, with the exception; neither stops the other commands.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Callable

from mlbench.checks.environment_probes import Requirement, install_command, requirement_for_module
from mlbench.cli_models import ModelOptions, add_model_options, resolve_model_options
from mlbench.errors import MlbenchError, OptionsError

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
    p.add_argument("--model", default="hrnet",
                   help="hrnet | cbam_resunet | ma_resunet (or a service id); default hrnet, or with --weights the "
                        "architecture the checkpoint must be")
    p.add_argument("--preset", default="fixed", choices=["fixed", "as_served"])
    p.add_argument("--threshold", type=float, default=None)
    p.add_argument("--input-size", type=int, default=None, help="model input side (default: the model's own)")
    p.add_argument("--no-holes", action="store_true", help="do not detect holes (RETR_EXTERNAL)")
    p.add_argument("--json", action="store_true", help="print the service's response JSON")
    p.add_argument("--overlay", metavar="PNG", help="also write the mask over the image to this PNG")
    p.set_defaults(run=_segment)


def _segment(args) -> int:
    from mlbench.pipeline.run import Pipeline

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

        from mlbench.image.display import overlay

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
    from importlib.util import find_spec
    from pathlib import Path

    for module in ("jupyterlab", "ipywidgets"):
        if find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    notebooks = Path(__file__).resolve().parents[1] / "notebooks"
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={args.port}",
               f"--notebook-dir={notebooks}"] + (["--allow-root"] if hasattr(os, "getuid") and os.getuid() == 0 else [])
    return subprocess.call(command)


# Sub-commands that live beside the concept they inspect:
# (command, module, function that adds its parser, the extra it needs beyond the core: "" for none).
_EXTERNAL_COMMANDS = [
    ("check-image", "mlbench.checks.image", "add_check_image_command", ""),
    ("check-weights", "mlbench.checks.weights", "add_check_weights_command", ""),
    ("triage", "mlbench.failures._triage", "add_triage_command", ""),
    ("doctor", "mlbench.checks.environment", "add_doctor_command", ""),
    ("report", "mlbench.cases._report", "add_report_command", ""),
    ("sweep", "mlbench.studies._sweep", "add_sweep_command", ""),
    ("compare", "mlbench.studies.compare", "add_compare_command", ""),
    ("memory", "mlbench.probes.cli", "add_memory_command", ""),
    ("tiles", "mlbench.studies._tile_fidelity", "add_tiles_command", ""),
    ("parity", "mlbench.studies._parity", "add_parity_command", ""),
    ("golden", "mlbench.studies.golden_cli", "add_golden_command", ""),
    ("serve", "mlbench.service.cli", "add_serve_command", "service"),
]
COMMAND_EXTRAS = {"lab": "lab", **{name: extra for name, _, _, extra in _EXTERNAL_COMMANDS if extra}}
"""The extra of ``pyproject.toml``'s optional-dependencies that each optional command needs."""

CANNOT_RUN = 3
"""Exit status of a command that cannot run in this environment."""


def _meta_model(args: argparse.Namespace, name: str):
    """``memory``'s model for a name: built at ``--size`` on the meta device, nothing allocated."""
    from mlbench.models import build_model

    return build_model(name, args.size, device="meta")


MODEL_COMMANDS = {
    "segment": ModelOptions(),
    "tiles": ModelOptions(),
    "parity": ModelOptions(),
    "memory": ModelOptions(build=_meta_model, note="its widths replace --size"),
    "compare": ModelOptions(many=True),
    "sweep": ModelOptions(many=True),
}
"""The commands that take a model, each given ``--weights PATH`` and ``--card JSON`` (:mod:`mlbench.cli_models`)."""


def _missing_module(error: BaseException | None) -> str | None:
    """The module a ``ModuleNotFoundError`` names: ``error`` itself or one it was raised ``from``."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, ModuleNotFoundError) and error.name:
            return error.name
        seen.add(id(error))
        error = error.__cause__
    return None


def _missing_requirement(command: str, error: BaseException) -> Requirement | None:
    """The requirement to install when ``command`` failed because a package is missing; None otherwise.

    The package is looked up among mlbench's declared requirements (with its extra, or its range
    for a core one); one not declared there (a dependency of a dependency) falls back to the
    command's own extra (:data:`COMMAND_EXTRAS`). A missing ``mlbench.*`` module is a broken
    install, not a missing extra: None.
    """
    module = _missing_module(error)
    if module is None or module.split(".")[0] == "mlbench":
        return None
    requirement = requirement_for_module(module)
    if requirement is None and command in COMMAND_EXTRAS:
        requirement = Requirement(module, module, "", COMMAND_EXTRAS[command])
    return requirement


def _install_hint(command: str, error: BaseException) -> str | None:
    """What is missing for ``command`` and the pip command that installs it; None for any other failure."""
    requirement = _missing_requirement(command, error)
    if requirement is None:
        return None
    part = f"part of the '{requirement.extra}' extra" if requirement.extra else "a core dependency of mlbench"
    return (f"`mlbench {command}` needs {requirement.name} ({part}), which is not installed here "
            f"({type(error).__name__}: {error}); install it: {install_command(requirement)}")


def _load_failure(command: str, module: str, error: BaseException) -> str:
    """Why ``command`` cannot run: the extra to install, or the exception its module raised."""
    hint = _install_hint(command, error)
    if hint is not None:
        return hint
    return (f"`mlbench {command}` could not be loaded: {module} raised {type(error).__name__}: {error}; "
            "the other commands still work. Fix that error, or reinstall mlbench (pip install -e .) and run "
            "`mlbench doctor`")


def _add_unavailable(sub, command: str, module: str, error: Exception) -> None:
    """List ``command`` all the same; running it (with any arguments) says why it cannot run."""
    message, requirement = _load_failure(command, module, error), _missing_requirement(command, error)
    short = install_command(requirement) if requirement else f"{module} failed to load ({type(error).__name__})"
    sub.choices.pop(command, None)  # its own add function may have failed half-way
    p = sub.add_parser(command, help=f"UNAVAILABLE here: {short}", description=message)
    p.set_defaults(run=lambda args: _fail(message), unavailable=True)


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return CANNOT_RUN


def build_parser() -> argparse.ArgumentParser:
    """The ``mlbench`` parser with every command; one that cannot load is listed as unavailable."""
    parser = argparse.ArgumentParser(prog="mlbench", description="Debug image-segmentation inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS.values():
        add(sub)
    for name, module, function, _ in _EXTERNAL_COMMANDS:
        try:
            getattr(importlib.import_module(module), function)(sub)
        except Exception as error:  # noqa: BLE001 - any failure stays with its own command
            _add_unavailable(sub, name, module, error)
    for name, options in MODEL_COMMANDS.items():
        if not sub.choices[name].get_default("unavailable"):
            add_model_options(sub.choices[name], options)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mlbench`` console script; returns the exit status."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "unavailable", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.run(resolve_model_options(args))
    except ModuleNotFoundError as exc:  # an optional package the command imports when it runs
        hint = _install_hint(args.command, exc)
        if hint is None:
            raise
        return _fail(hint)
    except MlbenchError as exc:
        print(f"mlbench {args.command}: {exc}", file=sys.stderr)
        if _missing_module(exc) is not None:
            return CANNOT_RUN
        return 2 if isinstance(exc, OptionsError) else 1


if __name__ == "__main__":
    sys.exit(main())
