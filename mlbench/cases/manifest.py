"""``case.json`` read as untrusted input: parsed within bounds, its shape checked, its file list
matched against the files, its options validated like a user's, its arrays read without pickle.

Everything :class:`~mlbench.cases.casefile.Case`, its replay and :func:`mlbench.report` read from
the manifest is checked here first, so a hostile or damaged case fails at load with one
:class:`CaseError` naming the file, the field and the fix, never later with a ``KeyError``.
"""

from __future__ import annotations

import io
import json
import math
import re
import typing
import zipfile
from typing import Any

import numpy as np

from mlbench.budgets import Budgets, budget_error
from mlbench.cases.bundle import CaseError
from mlbench.errors import OptionsError

__all__ = ["FORMAT", "parse_manifest", "check_manifest", "check_files", "check_options", "recorded_card",
           "read_npy", "read_mask"]

FORMAT = "mlbench-case/1"
MAX_DEPTH = 32
"""Nesting depth of ``case.json`` (a saved one has 6)."""

_NUM, _OPT_NUM, _OPT_STR, _OPT_INT = (int, float), (int, float, type(None)), (str, type(None)), (int, type(None))
_SHA = re.compile(r"[0-9a-f]{64}")
_STATS = {"shape?": ("list", int), "dtype?": str, "min?": _OPT_NUM, "max?": _OPT_NUM, "mean?": _OPT_NUM,
          "non_finite?": int}
_STAGE = {"status": str, "seconds?": _OPT_NUM, "summary?": str, "stats?": ("optional", _STATS), "count?": int}
_SCHEMA: dict[str, Any] = {
    "format": str, "name": str, "note": str, "failure_class": str, "preset": str, "options": dict,
    "traceback": str, "fix?": str,
    "model": {"name": str, "architecture": _OPT_STR, "size": _OPT_STR, "input_size": _OPT_INT,
              "input_multiple": _OPT_INT, "weights_file_sha256": _OPT_STR, "state_sha256": str, "weights": str,
              "parameters": int, "card": dict},
    "image": {"file": str, "bytes": int, "sha256": str},
    "stages": ("map", _STAGE),
    "outcome": {"status": str, "failed_stage": _OPT_STR, "error_type": _OPT_STR, "error_message": _OPT_STR,
                "polygons?": int, "mask_pixels?": int, "mask_fraction?": _NUM, "max_probability?": _NUM,
                "warning?": str},
    "diagnosis": {"failure_class": str, "explanation": str, "evidence?": str, "fix": str,
                  "others?": ("list", {"failure_class": str, "evidence": str})},
    "doctor": {"torch?": dict, "cpu?": dict,
               "gpu?": {"summary?": str, "devices?": ("list", {"index": int, "name": str, "memory_used_mib": _NUM,
                                                               "memory_total_mib": _NUM})}},
    "files": ("map", str),
}


def parse_manifest(data: bytes, where: str, limits: Budgets) -> dict[str, Any]:
    """``case.json``'s bytes as a dict: UTF-8, standard JSON (no NaN, no repeated keys), at most
    ``max_case_manifest_bytes`` and :data:`MAX_DEPTH` deep."""
    if len(data) > limits.max_case_manifest_bytes:
        raise budget_error(CaseError, "max_case_manifest_bytes", limits.max_case_manifest_bytes,
                           f"{where}/case.json", len(data), " bytes")
    fix = "restore the case from its original copy (case.json is written by mb.save_case)"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CaseError(f"{where}/case.json is not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}): "
                        f"{fix}") from None
    try:
        meta = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_no_repeats)
    except RecursionError:
        raise CaseError(f"{where}/case.json nests deeper than Python can parse; a case's is {MAX_DEPTH} deep at "
                        f"most: {fix}") from None
    except ValueError as exc:
        raise CaseError(f"{where}/case.json is not valid JSON ({str(exc)[:200]}): {fix}") from None
    if _depth(meta) > MAX_DEPTH:
        raise CaseError(f"{where}/case.json nests more than {MAX_DEPTH} levels deep; a saved case has 6: {fix}")
    if not isinstance(meta, dict):
        raise CaseError(f"{where}/case.json holds a JSON {type(meta).__name__}, not an object: {fix}")
    if meta.get("format") != FORMAT:
        raise CaseError(f"{where}/case.json has format {str(meta.get('format'))[:60]!r}; expected {FORMAT!r} (a case "
                        "saved by mb.save_case); save it again with this version of mlbench")
    return meta


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError(f"a key appears twice in one object: {sorted(k for k, _ in pairs if [p[0] for p in pairs].count(k) > 1)[:3]}")
    return out


def _depth(value: Any) -> int:
    """Nesting depth of a parsed JSON value, iteratively (no recursion on a hostile value)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                pending += [(child, level + 1) for child in (item.values() if isinstance(item, dict) else item)]
    return deepest


def _shape_errors(value: Any, spec: Any, path: str) -> list[str]:
    """What in ``value`` does not fit ``spec`` (a type or tuple of types, a dict of keys, ``key?``
    optional; ``("map", spec)`` / ``("list", spec)`` for every value / item; ``("optional", spec)``
    for null or ``spec``)."""
    if isinstance(spec, tuple) and spec and spec[0] == "optional":
        return [] if value is None else _shape_errors(value, spec[1], path)
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return [f"{path} is {_kind(value)}; expected an object"]
        out = []
        for key, sub in spec.items():
            name = key.rstrip("?")
            if name in value:
                out += _shape_errors(value[name], sub, f"{path}.{name}")
            elif not key.endswith("?"):
                out.append(f"{path}.{name} is missing")
        return out
    if isinstance(spec, tuple) and spec and spec[0] in ("map", "list"):
        container = dict if spec[0] == "map" else list
        if not isinstance(value, container):
            return [f"{path} is {_kind(value)}; expected {'an object' if container is dict else 'a list'}"]
        items = value.items() if container is dict else enumerate(value)
        return [e for key, item in items for e in _shape_errors(item, spec[1], f"{path}[{key!r}]")][:5]
    allowed = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        return [f"{path} is {_kind(value)}; expected {' or '.join(_type_name(t) for t in allowed)}"]
    return []


def _kind(value: Any) -> str:
    shown = repr(value)
    return f"{type(value).__name__} {shown[:40] + '...' if len(shown) > 40 else shown}"


def _type_name(t: type) -> str:
    return {type(None): "null", str: "a string", int: "an integer", float: "a number", dict: "an object",
            bool: "true/false"}.get(t, t.__name__)


def check_manifest(meta: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose fields are missing or of the wrong kind, or whose outcome, stages,
    failure class, model record or card cannot be right."""
    from mlbench.failures._triage import FAILURE_CLASSES
    from mlbench.pipeline.stages import STAGE_NAMES

    errors = _shape_errors(meta, _SCHEMA, "case.json")
    if not errors:
        outcome = meta["outcome"]
        if outcome["status"] not in ("done", "failed"):
            errors.append(f"case.json.outcome.status is {outcome['status'][:40]!r}; expected 'done' or 'failed'")
        elif outcome["status"] == "failed" and (outcome["failed_stage"] not in meta["stages"]
                                                or not isinstance(outcome["error_type"], str)
                                                or not isinstance(outcome["error_message"], str)):
            errors.append(f"case.json.outcome of a failed run needs a recorded failed_stage (not "
                          f"{str(outcome['failed_stage'])[:40]!r}), an error_type and an error_message")
        elif outcome["status"] == "done" and not {"polygons", "mask_fraction"} <= set(outcome):
            errors.append("case.json.outcome of a completed run lacks polygons or mask_fraction")
        errors += [f"case.json.stages has an unknown stage {name[:40]!r}" for name in meta["stages"] if name not in STAGE_NAMES]
        for label in (meta["failure_class"], meta["diagnosis"]["failure_class"]):
            if label not in (*FAILURE_CLASSES, "none"):
                errors.append(f"failure class {label[:40]!r} is unknown; expected one of {FAILURE_CLASSES} or 'none'")
        errors += [f"case.json.files[{rel[:60]!r}] is not a sha256 (64 hex digits)" for rel, sha in meta["files"].items()
                   if not _SHA.fullmatch(sha)]
        if not _SHA.fullmatch(meta["model"]["state_sha256"]):
            errors.append("case.json.model.state_sha256 is not a sha256 (64 hex digits)")
    if errors:
        raise CaseError(f"{where}/case.json is not a case manifest: {'; '.join(errors[:5])}. Restore the case from "
                        "its original copy, or save the run again with mb.save_case")
    try:
        recorded_card(meta)
    except (OptionsError, TypeError, ValueError) as exc:
        raise CaseError(f"{where}/case.json: the recorded model card cannot be a card ({str(exc)[:200]}); restore "
                        "the case from its original copy") from None


def recorded_card(meta: dict[str, Any]):
    """The model card a case recorded (values outside the card's fields left out)."""
    from mlbench.models.cards import ModelCard, card_fields

    values = {k: v for k, v in meta.get("model", {}).get("card", {}).items() if k in card_fields()}
    if str(values.get("normalization", "")).startswith("callable"):
        values.pop("normalization")
    for key in ("mean", "std", "foreground"):
        if key in values:
            values[key] = tuple(values[key])
    return ModelCard(**values, origins={"name": "case"})


def check_files(meta: dict[str, Any], files: dict[str, bytes], where: str, sha256: Any, extra: tuple[str, ...]) -> None:
    """Every listed file present with its sha256, nothing unlisted (but ``case.json`` and ``extra``),
    the image and (for a completed run) the mask listed, the image record matching its file."""
    listed = meta["files"]
    image = meta["image"]["file"]
    needed = [image] + (["outcome.npz"] if meta["outcome"]["status"] == "done" else [])
    missing_entry = [rel for rel in needed if rel not in listed]
    if missing_entry:
        raise CaseError(f"case {where}: case.json does not list {missing_entry} among its files (its list has "
                        f"{len(listed)}): every file of a case is listed with its sha256, so this list was emptied "
                        "or edited; restore the case from its original copy")
    for rel, expected in listed.items():
        if rel not in files:
            raise CaseError(f"case {where}: file {rel[:80]} is listed in case.json but missing; the case is incomplete: "
                            "copy it again from its sender")
        actual = sha256(files[rel])
        if actual != expected:
            raise CaseError(f"case {where}: {rel} has sha256 {actual[:16]}... but case.json records {expected[:16]}...; "
                            "the file was changed or damaged: restore the case from its original copy")
    unlisted = sorted(set(files) - set(listed) - {"case.json", *extra})
    if unlisted:
        raise CaseError(f"case {where}: {unlisted[:5]} {'is' if len(unlisted) == 1 else 'are'} not listed in case.json: "
                        "a case holds only the files its manifest lists with their sha256; remove them, or restore "
                        "the case from its original copy")
    if meta["image"]["sha256"] != listed[image] or meta["image"]["bytes"] != len(files[image]):
        raise CaseError(f"case {where}: case.json's image record ({meta['image']['bytes']} bytes, sha256 "
                        f"{meta['image']['sha256'][:16]}...) does not match {image}; restore the case from its original copy")
    if not re.fullmatch(r"image\.[a-z0-9]{1,8}", image):
        raise CaseError(f"case {where}: the image file is named {image[:60]!r}; a case's is image.<suffix>")


def check_options(meta: dict[str, Any], where: str, limits: Budgets) -> None:
    """Validate the recorded preset and options as :func:`~mlbench.pipeline.options.make_options`
    does a user's (names, choices, ranges), plus their types and the size of the model input they
    ask for (within ``max_decoded_bytes``, as a decoded image)."""
    from mlbench.pipeline.options import PipelineOptions, make_options, reject_unknown_options

    options = meta["options"]
    fix = "the case was edited or made by another tool: restore it from its original copy"
    try:
        reject_unknown_options(options)
        for name, hint in typing.get_type_hints(PipelineOptions).items():
            if name in options and _shape_errors(options[name], _allowed(hint), name):
                raise OptionsError(f"option {name}={_kind(options[name])} is not {_allowed_words(hint)}")
        make_options(meta["preset"], **options)
    except OptionsError as exc:
        raise CaseError(f"{where}/case.json: {exc}; {fix}") from None
    for label, side in (("option input_size", options.get("input_size")), ("model.input_size", meta["model"]["input_size"])):
        if side is not None:
            check_input_side(label, side, where, limits)


def check_input_side(label: str, side: int, where: str, limits: Budgets, channels: int = 3) -> None:
    """Refuse a model input side whose float32 input would be larger than a decoded image may be."""
    if side < 1:
        raise CaseError(f"{where}/case.json: {label}={side} is not a positive side; {label.split('.')[-1]} >= 16")
    nbytes = side * side * channels * 4
    if nbytes > limits.max_decoded_bytes:
        raise budget_error(CaseError, "max_decoded_bytes", limits.max_decoded_bytes,
                           f"{where}/case.json: {label}={side} asks for a model input of {side}x{side} x {channels} "
                           "channels x 4 bytes", nbytes, " bytes")


def _allowed(hint: Any) -> tuple[type, ...]:
    allowed = typing.get_args(hint) or (hint,)
    return tuple(t for t in allowed) + ((int,) if float in allowed else ())


def _allowed_words(hint: Any) -> str:
    return " or ".join(_type_name(t) for t in (typing.get_args(hint) or (hint,)))


def read_npy(data: bytes, what: str, limits: Budgets) -> np.ndarray:
    """An ``.npy`` array from bytes, its header checked first: no object dtype (pickle), the data
    exactly as long as the header says, at most ``max_pixels`` elements per channel plane."""
    handle = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"format version {version}; np.save writes 1.0 or 2.0")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle, max_header_size=10_000)
    except (ValueError, SyntaxError, TypeError, EOFError) as exc:
        raise CaseError(f"{what} is not a .npy array ({str(exc)[:160]}); restore the case from its original copy") from None
    if dtype.hasobject or dtype.itemsize == 0:
        raise CaseError(f"{what} holds dtype {dtype} (objects need pickle, which cases never use); restore the case")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data) - handle.tell():
        raise CaseError(f"{what}: the header announces {shape} {dtype} ({count * dtype.itemsize:,} bytes) but "
                        f"{len(data) - handle.tell():,} bytes follow; the file is damaged or forged")
    if len(shape) > 3 or count > limits.max_pixels * 4:
        raise CaseError(f"{what}: shape {shape} is not an image of at most {limits.max_pixels:,} pixels "
                        "(max_pixels) with at most 4 channels; restore the case from its original copy")
    return np.load(io.BytesIO(data), allow_pickle=False)


def read_mask(data: bytes, what: str, limits: Budgets) -> np.ndarray:
    """The recorded mask of ``outcome.npz`` (packed bits and shape), every member checked as :func:`read_npy`."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = {info.filename: info for info in archive.infolist()}
            if sorted(infos) != ["mask_bits.npy", "shape.npy"] or \
                    sum(i.file_size for i in infos.values()) > limits.max_pixels // 8 + 4096:
                raise CaseError(f"{what} holds {sorted(infos)[:4]} ({sum(i.file_size for i in infos.values()):,} bytes "
                                "inflated); expected mask_bits.npy and shape.npy, packed bits of a mask")
            arrays = {name[:-4]: read_npy(archive.read(info), f"{what}/{name}", limits) for name, info in infos.items()}
    except CaseError:
        raise
    except Exception as exc:  # zipfile and zlib errors of a damaged archive
        raise CaseError(f"{what} is not a readable npz ({type(exc).__name__}: {str(exc)[:160]}); restore the case") from None
    shape, bits = arrays["shape"], arrays["mask_bits"]
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or bits.dtype != np.uint8 or bits.ndim != 1 \
            or (shape <= 0).any() or int(shape[0]) * int(shape[1]) > limits.max_pixels \
            or bits.size != -(-int(shape[0]) * int(shape[1]) // 8):
        raise CaseError(f"{what}: shape {shape.tolist()[:4]} and {bits.size:,} packed bytes are not a mask of at most "
                        f"{limits.max_pixels:,} pixels; restore the case from its original copy")
    count = int(shape[0]) * int(shape[1])
    return np.unpackbits(bits)[:count].reshape(int(shape[0]), int(shape[1])).astype(bool)
