"""Who vouches for a case's ``case.json``: an HMAC with this machine's key, or nobody.

Every file of a case is listed in ``case.json`` with its sha256, so ``case.json`` decides what
the case is; but ``case.json`` travels inside the case, and whoever can edit the case can edit
it too. :func:`mlbench.save_case` therefore writes ``case.sig``: an HMAC-SHA256 of
the exact bytes of ``case.json`` under a secret key that never leaves this machine (a random
32-byte key created on first use in ``$XDG_CONFIG_HOME/mlbench/case-signing.key``, default
``~/.config/mlbench/``, mode 0600; the environment variable ``MLBENCH_CASE_KEY_FILE`` names
another file, e.g. one shared by a team's machines). :func:`verify` says how far a case can be
trusted, as a :class:`~mlbench.findings.Problem`:

- ``signed``: made with this key and unchanged since. An edit of ``case.json`` (and so of any
  file, whose sha256 ``case.json`` records) makes the MAC differ: the case is refused.
- ``bundled``: shipped with mlbench in ``data/cases`` (trusted as far as mlbench's own code is).
- ``foreign``: signed with another key (another machine, another user): it cannot be verified
  here. A HMAC proves nothing to someone without the key, so this is the normal state of a case
  sent by another team.
- ``unsigned``: no ``case.sig`` (an older case, or one whose signature was removed).

Foreign and unsigned cases still load, with their contents checked for self-consistency only:
every listed file present with its sha256, no unlisted file, the file list complete, the
manifest well formed and its options within the budgets. Someone who edits such a case and
rewrites ``case.json`` to match produces a consistent case that loads: the finding says that
nothing vouches for it, and ``load_case(path, require_signature=True)`` refuses anything not
signed here. What the key does not protect against: someone who can read the key file (anyone
with your account) can sign anything; a case signed here and then re-labelled with another key
id loads as ``foreign``, never as ``signed``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import warnings
from pathlib import Path

from mlbench.budgets import read_regular
from mlbench.errors import MlbenchError, MlbenchWarning
from mlbench.findings import Problem
from mlbench.paths import data_dir

__all__ = ["KEY_ENV", "SIGNATURE_FILE", "key_path", "sign", "verify"]

KEY_ENV = "MLBENCH_CASE_KEY_FILE"
SIGNATURE_FILE = "case.sig"
_FORMAT = "mlbench-case-signature/1"
_KEY_BYTES = 32
_SIGNATURE_MAX = 1024


def key_path() -> Path:
    """The key file: ``$MLBENCH_CASE_KEY_FILE``, else ``$XDG_CONFIG_HOME/mlbench/case-signing.key``
    (``~/.config`` when ``XDG_CONFIG_HOME`` is unset)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "mlbench" / "case-signing.key"


def _read_key(path: Path, error: type[MlbenchError]) -> bytes | None:
    """The key in ``path`` (64 hex digits), None when the file does not exist."""
    if not path.exists() and not path.is_symlink():
        return None
    text = read_regular(path, error, max_bytes=4096).decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != _KEY_BYTES:
        raise error(f"the case signing key {path} is not {2 * _KEY_BYTES} hex digits ({len(text)} characters found); "
                    f"delete it to have a new one made (cases signed with the old key then load as foreign), "
                    f"or point {KEY_ENV} at the right key file")
    return key


def _create_key(path: Path) -> bytes:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = secrets.token_bytes(_KEY_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key.hex() + "\n")
    return key


def _key_id(key: bytes) -> str:
    return hashlib.sha256(b"mlbench case key id\0" + key).hexdigest()[:16]


def _mac(key: bytes, manifest: bytes) -> str:
    return hmac.new(key, b"mlbench-case/1\0" + manifest, hashlib.sha256).hexdigest()


def sign(manifest: bytes, error: type[MlbenchError]) -> bytes | None:
    """The ``case.sig`` of ``manifest`` (the bytes of ``case.json``), the key made on first use.

    When the key cannot be created (a read-only home folder), warns with
    :class:`~mlbench.errors.MlbenchWarning` and returns None: the case is saved unsigned.
    """
    path = key_path()
    key = _read_key(path, error)
    if key is None:
        try:
            key = _create_key(path)
        except OSError as exc:
            key = _read_key(path, error) if path.is_file() else None  # another process made it first
            if key is None:
                warnings.warn(f"case saved unsigned: the signing key {path} cannot be created ({exc.strerror or exc}); "
                              f"set {KEY_ENV} to a writable file path to sign cases", MlbenchWarning, stacklevel=3)
                return None
    record = {"format": _FORMAT, "algorithm": "hmac-sha256", "key_id": _key_id(key), "mac": _mac(key, manifest)}
    return (json.dumps(record, indent=1) + "\n").encode()


def _parse(signature: bytes, where: str, error: type[MlbenchError]) -> dict[str, str]:
    fix = f"the signature is damaged: restore the case from its original copy, or delete {SIGNATURE_FILE} to load it unsigned"
    if len(signature) > _SIGNATURE_MAX:
        raise error(f"{where}/{SIGNATURE_FILE} has {len(signature):,} bytes; a signature has under {_SIGNATURE_MAX}: {fix}")
    try:
        record = json.loads(signature.decode("utf-8"))
    except ValueError as exc:
        raise error(f"{where}/{SIGNATURE_FILE} is not a JSON signature ({type(exc).__name__}: {exc}): {fix}") from None
    if not isinstance(record, dict) or record.get("format") != _FORMAT or record.get("algorithm") != "hmac-sha256" \
            or not re.fullmatch(r"[0-9a-f]{16}", str(record.get("key_id"))) \
            or not re.fullmatch(r"[0-9a-f]{64}", str(record.get("mac"))):
        raise error(f"{where}/{SIGNATURE_FILE} is not a {_FORMAT} record with an hmac-sha256 'key_id' and 'mac': {fix}")
    return record


def _bundled(source: Path) -> bool:
    try:
        return source.resolve().is_relative_to((data_dir() / "cases").resolve())
    except OSError:
        return False


def verify(manifest: bytes, signature: bytes | None, source: Path, error: type[MlbenchError]) -> Problem:
    """How far the case at ``source`` can be trusted (see the module docstring): a Problem whose
    ``code`` is ``signed``, ``bundled``, ``foreign`` or ``unsigned``.

    Raises
    ------
    error
        When the case was signed with this machine's key and ``case.json`` changed since, or
        ``case.sig`` is not a signature.
    """
    record = _parse(signature, str(source), error) if signature is not None else None
    key = _read_key(key_path(), error)
    if record is not None and key is not None and hmac.compare_digest(record["key_id"], _key_id(key)):
        if not hmac.compare_digest(record["mac"], _mac(key, manifest)):
            raise error(f"case {source}: case.json was changed after the case was saved (its HMAC does not match "
                        f"{SIGNATURE_FILE}, signed with this machine's key {record['key_id']}): the case was edited or "
                        "damaged; restore it from its original copy")
        return Problem("signed", f"signed with this machine's key ({record['key_id']}) and unchanged since")
    if _bundled(source):
        return Problem("bundled", "shipped with mlbench (data/cases); contents checked for self-consistency")
    checked = "contents checked for self-consistency only (nothing vouches that this is the case as it was saved)"
    if record is not None:
        here = f"this machine's is {_key_id(key)}" if key is not None else "this machine has no key yet"
        return Problem("foreign", f"foreign case: signed with another key ({record['key_id']}; {here}), which "
                                  f"cannot be verified here; {checked}")
    return Problem("unsigned", f"unsigned case (no {SIGNATURE_FILE}): {checked}")
