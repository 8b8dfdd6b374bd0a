"""The ``mlbench`` command line loads every command: a missing extra or a broken module stays with its command."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

import mlbench.cli as cli
from mlbench.cli import CANNOT_RUN, COMMAND_EXTRAS, build_parser, main

ALL_COMMANDS = {"segment", "lab", "check-image", "check-weights", "triage", "doctor", "report", "sweep", "compare",
                "memory", "tiles", "golden", "parity", "serve"}
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@pytest.fixture
def forget(monkeypatch):
    """``forget(prefix)`` drops ``prefix`` and its submodules from ``sys.modules`` so the next import re-runs;
    afterwards the originals are back and whatever this test imported under ``prefix`` is gone."""
    before = set(sys.modules)
    prefixes = []

    def drop(prefix: str) -> None:
        prefixes.append(prefix)
        for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
            monkeypatch.delitem(sys.modules, name)

    yield drop
    for name in [n for n in sys.modules if n not in before and any(n.startswith(p) for p in prefixes)]:
        del sys.modules[name]


@pytest.fixture
def no_fastapi(monkeypatch, forget):
    """The 'service' extra is not installed: ``import fastapi`` fails and mlbench.service imports afresh."""
    forget("mlbench.service")
    monkeypatch.setitem(sys.modules, "fastapi", None)


def _help_lines(parser) -> dict[str, str]:
    sub = next(a for a in parser._actions if a.dest == "command")
    return {a.dest: a.help for a in sub._choices_actions}


def _triage_works(tmp_path, capsys) -> None:
    log = tmp_path / "log.txt"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n")
    assert main(["triage", str(log)]) in (0, 1)
    assert "cuda_oom" in capsys.readouterr().out


def test_every_command_loads_here():
    parser = build_parser()
    assert set(_help_lines(parser)) == ALL_COMMANDS
    assert not any(h.startswith("UNAVAILABLE") for h in _help_lines(parser).values())


def test_the_extras_named_are_pyprojects():
    optional = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert COMMAND_EXTRAS == {"lab": "lab", "serve": "service"} and set(COMMAND_EXTRAS.values()) <= set(optional)


def test_one_missing_extra_lists_the_command_and_says_what_to_install(no_fastapi, tmp_path, capsys):
    helps = _help_lines(build_parser())
    assert set(helps) == ALL_COMMANDS and helps["serve"] == "UNAVAILABLE here: pip install 'mlbench[service]'"
    assert main(["serve", "--port", "9000", "--workers", "2"]) == CANNOT_RUN
    err = capsys.readouterr().err
    assert err.startswith("`mlbench serve` needs fastapi (part of the 'service' extra), which is not installed here "
                          "(ModuleNotFoundError: import of fastapi halted; None in sys.modules); "
                          "install it: pip install 'mlbench[service]'")
    _triage_works(tmp_path, capsys)


def test_two_failing_command_modules_leave_the_others_working(no_fastapi, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "mlbench.studies._tile_fidelity", None)
    helps = _help_lines(build_parser())
    assert set(helps) == ALL_COMMANDS
    assert helps["serve"] == "UNAVAILABLE here: pip install 'mlbench[service]'"
    assert helps["tiles"] == "UNAVAILABLE here: mlbench.studies._tile_fidelity failed to load (ModuleNotFoundError)"
    assert main(["tiles", "image.png", "--model", "hrnet"]) == CANNOT_RUN
    assert capsys.readouterr().err.startswith(
        "`mlbench tiles` could not be loaded: mlbench.studies._tile_fidelity raised ModuleNotFoundError: import of "
        "mlbench.studies._tile_fidelity halted; None in sys.modules; the other commands still work.")
    assert main(["serve"]) == CANNOT_RUN and "pip install 'mlbench[service]'" in capsys.readouterr().err
    _triage_works(tmp_path, capsys)


def _fake_command(monkeypatch, tmp_path, module: str, body: str, command: str) -> None:
    (tmp_path / f"{module}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "_EXTERNAL_COMMANDS", [*cli._EXTERNAL_COMMANDS, (command, module, "add", "")])


def test_each_missing_extra_is_named_by_pyproject(no_fastapi, monkeypatch, tmp_path, capsys):
    """A command whose module needs ``distributed`` is sent to the 'dask' extra, found in the metadata."""
    monkeypatch.setitem(sys.modules, "distributed", None)
    _fake_command(monkeypatch, tmp_path, "fake_dask_command", "import distributed\n", "cluster")
    helps = _help_lines(build_parser())
    assert helps["cluster"] == "UNAVAILABLE here: pip install 'mlbench[dask]'"
    assert helps["serve"] == "UNAVAILABLE here: pip install 'mlbench[service]'"
    assert main(["cluster"]) == CANNOT_RUN
    assert "`mlbench cluster` needs distributed (part of the 'dask' extra)" in capsys.readouterr().err


def test_a_module_failing_for_another_reason_says_how(monkeypatch, tmp_path, capsys):
    _fake_command(monkeypatch, tmp_path, "fake_broken_command", "raise RuntimeError('libfoo.so: bad ELF header')\n", "broken")
    body = "def add(sub):\n    p = sub.add_parser('halfway')\n    p.add_argument('--x', type=nope)\n"
    (tmp_path / "fake_halfway_command.py").write_text(body)
    monkeypatch.setattr(cli, "_EXTERNAL_COMMANDS", [*cli._EXTERNAL_COMMANDS, ("halfway", "fake_halfway_command", "add", "")])
    helps = _help_lines(build_parser())
    assert helps["broken"] == "UNAVAILABLE here: fake_broken_command failed to load (RuntimeError)"
    assert main(["broken", "--anything"]) == CANNOT_RUN
    assert capsys.readouterr().err.startswith(
        "`mlbench broken` could not be loaded: fake_broken_command raised RuntimeError: libfoo.so: bad ELF header; ")
    assert main(["halfway"]) == CANNOT_RUN  # its add function failed after add_parser: no "conflicting subparser"
    assert "fake_halfway_command raised NameError: name 'nope' is not defined" in capsys.readouterr().err


def test_missing_packages_found_when_a_command_runs(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)
    assert main(["lab", "--port", "1"]) == CANNOT_RUN
    assert "`mlbench lab` needs ipywidgets (part of the 'lab' extra)" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "distributed", None)
    assert main(["sweep", str(tmp_path), "--executor", "local"]) == CANNOT_RUN
    assert "pip install 'mlbench[dask]'" in capsys.readouterr().err


def test_a_missing_mlbench_module_at_run_time_is_a_bug_not_an_extra(monkeypatch, tmp_path):
    body = ("def add(sub):\n    sub.add_parser('bug').set_defaults(run=run)\n\n"
            "def run(args):\n    import mlbench.no_such_module\n")
    _fake_command(monkeypatch, tmp_path, "fake_bug_command", body, "bug")
    with pytest.raises(ModuleNotFoundError, match="No module named 'mlbench.no_such_module'"):
        main(["bug"])


def test_unknown_arguments_of_a_working_command_are_still_refused(capsys):
    with pytest.raises(SystemExit, match="2"):
        main(["triage", "x.log", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
