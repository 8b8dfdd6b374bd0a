"""Budgets: every bound on what reading one untrusted file may cost, in one place.

Checkpoints, images and case files come from anywhere (an upload, a colleague, a download).
Before a byte is decoded or unpickled, each reader checks the file against a :class:`Budgets`:
bytes read, decoded bytes (pixels x channels x bytes per sample, from the header), decompressed
bytes (zip members), pickle opcodes, nesting depth, expanded objects and memo/stack size, tensor
count and seconds; for a case file its members, their sizes as they inflate, its manifest, and
the memory its replay would need.
Past a budget the reader raises the caller's error class (:class:`~mlbench.errors.WeightsError`,
:class:`~mlbench.errors.ImageError`) naming the budget and how to raise it.

The defaults suit the service's checkpoints (training dicts up to about 1 GB) and microscopy up
to 64 megapixels; raise one per call (``budgets=Budgets(max_pickle_depth=500)``) or for the
process with an environment variable (``MLBENCH_MAX_PICKLE_DEPTH=500``), read at each call.

This module also refuses what is not a regular file (FIFOs, devices, sockets and symlinks to
them) before opening it: reading ``/dev/zero`` never ends and opening a FIFO blocks forever.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from mlbench.errors import MlbenchError, OptionsError

__all__ = ["Budgets", "budgets", "budget_error", "Deadline", "describe_file", "open_regular", "read_regular"]

_GIB, _MIB = 1 << 30, 1 << 20


@dataclass(frozen=True)
class Budgets:
    """Bounds on the work of reading one untrusted file. Every field is also the environment
    variable ``MLBENCH_`` + its name in capitals (``MLBENCH_MAX_SECONDS=60``).

    Attributes
    ----------
    max_file_bytes : int
        Bytes read from one file (a checkpoint, an image, an upload); default 2 GiB.
    max_pixels : int
        Pixels of a decoded image, from its header; default 64,000,000.
    max_decoded_bytes : int
        Bytes of a decoded image (pixels x channels x bytes per sample), from its header before
        any pixel is decoded; default 256 MiB (an 8-bit RGB image of 89 megapixels, a 16-bit RGB
        one of 44, a float64 RGB one of 11). Reading takes about three times this at its peak.
    max_decompressed_bytes : int
        Bytes the members of a zip checkpoint declare (and may inflate to), all members
        together (``torch.save`` stores them uncompressed, so this is about the file size); also
        the tensor storage a pickle may declare; default 2 GiB.
    max_pickle_ops : int
        Opcodes in one pickle; default 4,000,000: a state dict takes about 30 per tensor, so
        ``max_tensors`` of them fit (a training dict with optimizer state has about 200,000).
    max_pickle_depth : int
        Nesting depth of containers in a pickle (a tuple in a tuple ...); default 100 (checkpoints use under 10).
    max_pickle_objects : int
        Objects in the pickle once shared references are expanded (what a repr or a hash walks);
        default 10,000,000.
    max_pickle_memo : int
        Entries of the unpickler's memo, and of its stack; default 1,000,000.
    max_tensors : int
        Tensors (and storages, and zip members) in one checkpoint; default 100,000.
    max_seconds : float
        Seconds the checks of one file may take (scans, CRCs, image integrity), and an isolated
        decode (:mod:`mlbench.isolation`) with them; default 30.
    max_decoder_memory : int
        Address space an isolated decode (``read_image(isolate=True)``, :func:`mlbench.check_image`)
        may add to its child process; default 2 GiB (a decode takes about three times
        ``max_decoded_bytes`` at its peak).
    max_case_bytes : int
        Bytes of one case file (:func:`mlbench.load_case`): the zip itself, and all its members
        (or a case folder's files) together as read, counted while they inflate; default 512 MiB.
    max_case_member_bytes : int
        Bytes of one member of a case (the image, the mask, a preview), counted while it
        inflates; default 256 MiB (the largest image ``max_decoded_bytes`` lets a run decode).
    max_case_members : int
        Files (zip members, or entries of a case folder) in one case; default 64 (a saved case
        has at most six).
    max_case_manifest_bytes : int
        Bytes of a case's ``case.json``; default 4 MiB (a saved one is 5-50 KB).
    max_replay_bytes : int
        Peak memory of the forward pass that replaying a case would need, predicted on the
        ``meta`` device (:func:`mlbench.estimate_memory`) before it runs; default 4 GiB
        (the full-size MA-ResUNet at the service's 1024 px needs 1.45 GiB).
    max_triage_bytes : int
        Bytes of one log (text, file or stream) :func:`mlbench.triage` reads; default 64 MiB. Past
        it, triage reads the first quarter and the last three quarters (errors are usually at the
        end), counts the lines between, and says so in the diagnosis's ``input_note``.
    """

    max_file_bytes: int = 2 * _GIB
    max_pixels: int = 64_000_000
    max_decoded_bytes: int = 256 * _MIB
    max_decompressed_bytes: int = 2 * _GIB
    max_pickle_ops: int = 4_000_000
    max_pickle_depth: int = 100
    max_pickle_objects: int = 10_000_000
    max_pickle_memo: int = 1_000_000
    max_tensors: int = 100_000
    max_seconds: float = 30.0
    max_decoder_memory: int = 2 * _GIB
    max_case_bytes: int = 512 * _MIB
    max_case_member_bytes: int = 256 * _MIB
    max_case_members: int = 64
    max_case_manifest_bytes: int = 4 * _MIB
    max_replay_bytes: int = 4 * _GIB
    max_triage_bytes: int = 64 * _MIB

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise OptionsError(f"Budgets({item.name}={value!r}): every budget is a positive number "
                                   f"(default {item.default!r}); pass a larger one to allow more")


def budgets(given: Budgets | None = None, **overrides: float) -> Budgets:
    """The budgets in force.

    Parameters
    ----------
    given : Budgets, optional
        The caller's budgets; default the :class:`Budgets` defaults with the ``MLBENCH_MAX_*``
        environment variables applied (read now, not at import).
    **overrides
        Single budgets replaced on top (``max_pixels=...``).

    Returns
    -------
    Budgets

    Raises
    ------
    OptionsError
        When ``given`` is not a :class:`Budgets`, an environment variable is not a number, or a value
        is not positive.
    """
    if given is not None and not isinstance(given, Budgets):
        raise OptionsError(f"budgets must be a mlbench.budgets.Budgets, got {type(given).__name__} {given!r:.80}; "
                           "e.g. budgets=Budgets(max_pixels=4 * 10**8), or leave it out for the defaults")
    if given is None:
        found = {}
        for item in fields(Budgets):
            name = "MLBENCH_" + item.name.upper()
            if os.environ.get(name):
                try:
                    found[item.name] = type(item.default)(float(os.environ[name]))
                except ValueError:
                    raise OptionsError(f"environment variable {name}={os.environ[name]!r} is not a number; "
                                       f"set it to a positive number (default {item.default}) or unset it") from None
        given = Budgets(**found)
    return replace(given, **overrides) if overrides else given


def budget_error(error: type[MlbenchError], name: str, limit: float, what: str, actual: float,
                 unit: str = "") -> MlbenchError:
    """``error`` saying ``what`` (``actual``) exceeds budget ``name`` (``limit``) and how to raise it;
    its ``budget`` attribute is ``name``."""
    shown = f"{actual:,.1f}" if isinstance(actual, float) else f"{actual:,}"
    exc = error(f"{what}: {shown}{unit} exceeds the budget {name} = {limit:,}{unit} (nothing past it was read "
                f"or built); if you trust the file, raise it: budgets=Budgets({name}=...) from mlbench.budgets, "
                f"or the environment variable MLBENCH_{name.upper()}")
    exc.budget = name
    return exc


class Deadline:
    """The ``max_seconds`` budget of one file's checks: :meth:`check` raises once it has passed."""

    def __init__(self, seconds: float, error: type[MlbenchError]) -> None:
        self.seconds, self.error, self.start = seconds, error, time.monotonic()

    def check(self, what: str) -> None:
        """Raise ``error`` naming ``max_seconds`` when the time is up, saying what was being done."""
        spent = time.monotonic() - self.start
        if spent > self.seconds:
            raise budget_error(self.error, "max_seconds", self.seconds, f"{what} took too long", round(spent, 1), " s")


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind(mode: int) -> str | None:
    return next((words for test, words in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def describe_file(path: str | os.PathLike) -> tuple[str, str]:
    """What ``path`` is, found with ``stat`` only (nothing is opened): ``(code, words)``.

    ``code`` is ``"regular"`` (``words`` empty), ``"missing"`` (``"does not exist"`` or a broken
    symlink) or ``"not_a_file"`` (``"is a FIFO (named pipe)"``, ``"is a symlink to '/dev/zero',
    a character device"`` ...).
    """
    text = os.fspath(path)
    if isinstance(text, str) and not text.strip():
        return "missing", f"is {'an empty path' if not text else 'only blanks'} ({text!r}): no file was named"
    if ("\0" if isinstance(text, str) else b"\0") in text:
        return "missing", "holds a NUL character, which no file name can: check how the path was built"
    path = Path(path)
    link = f"is a symlink to {os.readlink(path)!r}, which " if path.is_symlink() else ""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing", ((link + "does not exist") if link else "does not exist") + _missing_hint(str(text))
    except OSError as exc:
        return "not_a_file", f"cannot be examined ({type(exc).__name__}: {exc.strerror})"
    kind = _kind(mode)
    if kind is None:
        return "regular", ""
    return "not_a_file", (f"{link}is {kind}" if link else f"is {kind}")


def open_regular(path: str | os.PathLike, error: type[MlbenchError], max_bytes: int | None = None):
    """Open a regular file for reading, refusing anything else before and after opening.

    The file is opened non-blocking (a FIFO swapped in after the check cannot block) and checked
    again on its descriptor.

    Parameters
    ----------
    path : str or PathLike
    error : type of MlbenchError
        The error to raise (``WeightsError`` for a checkpoint, ``ImageError`` for an image).
    max_bytes : int, optional
        The largest size accepted; default the ``max_file_bytes`` budget.

    Returns
    -------
    A binary file object (``rb``).

    Raises
    ------
    error
        When ``path`` is missing or not a regular file (saying what it is), or larger than
        ``max_bytes`` (default: the ``max_file_bytes`` budget).
    """
    code, words = describe_file(path)
    if code != "regular":
        raise _not_a_file(error, path, words, code)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise _not_a_file(error, path, f"cannot be opened ({type(exc).__name__}: {exc.strerror})",
                          "unreadable") from None
    info = os.fstat(fd)
    kind = _kind(info.st_mode)
    if kind is not None:
        os.close(fd)
        raise _not_a_file(error, path, f"is {kind}", "not_a_file")
    limit = budgets().max_file_bytes if max_bytes is None else max_bytes
    if info.st_size > limit:
        os.close(fd)
        raise budget_error(error, "max_file_bytes", limit, f"{path}: the file size", info.st_size, " bytes")
    return os.fdopen(fd, "rb")


def _missing_hint(text: str) -> str:
    """Why a path that does not exist may be wrong, when its text says: a URL, ``~``, blanks around
    it, a Windows path here, or a file of its folder with the same extension and a name close to it
    (another case, a typo)."""
    if re.match(r"file://", text, re.I):
        return f" (a file:// URL: pass the path after it, {text[7:]!r})"
    if re.match(r"[a-z][a-z0-9+.-]*://", text, re.I):
        return " (a URL, not a path: files are read from this machine only, download it first)"
    if text != text.strip():
        return f" (the path starts or ends with blanks, {text!r}: copied with a newline or a space?)"
    if text.startswith("~"):
        return " (a leading ~ is not expanded here: pass os.path.expanduser(path))"
    if os.sep == "/" and re.match(r"[A-Za-z]:[\\/]|\\\\", text):
        return " (a Windows path: on this machine folders are separated by / and there are no drive letters)"
    folder = Path(text).parent
    if not folder.is_dir():
        return f" (its folder {str(folder)!r} does not exist either)" if str(folder) not in ("", ".") else ""
    try:
        with os.scandir(folder) as entries:
            names = [entry.name for _, entry in zip(range(10_000), entries)]
    except OSError:
        return ""
    wanted = Path(text)
    names = [name for name in names if Path(name).suffix.lower() == wanted.suffix.lower()]
    close = [name for name in names if name.lower() == wanted.name.lower()]  # another case first
    close += [name for name in difflib.get_close_matches(wanted.name, names, n=3, cutoff=0.75) if name not in close]
    return f" (in {str(folder)!r}: did you mean {' or '.join(map(repr, close[:3]))}?)" if close else ""


def _not_a_file(error: type[MlbenchError], path, words: str, code: str) -> MlbenchError:
    if code == "missing":
        exc = error(f"{path}: {words} (absolute path tried: {Path(path).absolute()}, working directory: "
                    f"{Path.cwd()}); check the path or pass an absolute one")
        exc.code = code
        return exc
    if code == "unreadable":
        exc = error(f"{path} {words}; check its permissions")
    else:
        exc = error(f"{path} {words}, not a regular file: refused before reading (it could block or never end); "
                    "pass the path of a regular file, or copy the data into one")
    exc.code = code
    return exc


def read_regular(path: str | os.PathLike, error: type[MlbenchError], max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file, at most ``max_bytes`` (default the ``max_file_bytes`` budget).

    Raises
    ------
    error
        As :func:`open_regular`, or when the file grows past the budget while it is read.
    """
    limit = budgets().max_file_bytes if max_bytes is None else max_bytes
    with open_regular(path, error, limit) as handle:
        size = os.fstat(handle.fileno()).st_size
        parts = [handle.read(size)] if size else []  # the size it says, then whatever it grew by
        total = len(parts[0]) if parts else 0
        while total <= limit and (chunk := handle.read(min(1 << 20, limit + 1 - total))):
            parts.append(chunk)
            total += len(chunk)
    if total > limit:
        raise budget_error(error, "max_file_bytes", limit, f"{path}: the bytes read", total, " bytes")
    return parts[0] if len(parts) == 1 else b"".join(parts)
