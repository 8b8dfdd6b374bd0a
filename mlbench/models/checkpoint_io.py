"""Reading a checkpoint file without running code from it.

The file-level half of :func:`mlbench.check_weights`: format sniffing (zip pickle, legacy
pickle, safetensors, and the usual impostors: empty files, HTML error pages, git-lfs
pointers), then, within the :class:`~mlbench.budgets.Budgets`, the zip CRC check that
``torch.load`` skips and a scan of every pickle (:mod:`mlbench.models.checkpoint_formats`,
:mod:`mlbench.models.pickle_scan`); only a file that passes is given to ``torch.load`` with
``weights_only=True``, extra globals accepted only from a named allowlist
(``argparse.Namespace``), recording the device each tensor was saved on. FIFOs, devices and
sockets are refused before they are opened.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from mlbench.budgets import Budgets, Deadline, budgets, open_regular
from mlbench.errors import WeightsError
from mlbench.image.formats import sniff_format
from mlbench.image.other_formats import file_kind
from mlbench.models.checkpoint_formats import ALLOWED_GLOBALS, FileFacts, load_pickled, load_safetensors
from mlbench.models.pickle_scan import scan_pickle

__all__ = ["ALLOWED_GLOBALS", "BLOCKING", "PREFIX_ORIGINS", "FileFacts", "sniff_checkpoint", "inspect_file", "unwrap",
           "strip_prefix", "split_wrapper", "StateDictRead", "read_state_dict"]

_WRAPPERS = ("model_state_dict", "state_dict", "model", "net", "weights")
_EMA_WRAPPERS = ("ema_state_dict", "state_dict_ema", "model_ema", "ema")
"""Where training code keeps exponential-moving-average weights (timm, Lightning callbacks, YOLO)."""
PREFIX_ORIGINS = {"module.": "DataParallel/DistributedDataParallel",
                  "model.": "a wrapper module (a Lightning module's model)", "net.": "a wrapper module (its net)",
                  "_orig_mod.": "a torch.compile'd model"}
"""The usual wrapper prefixes of state-dict keys, in the order they are tried, and what each was saved from."""
_PREFIXES = tuple(PREFIX_ORIGINS)
BLOCKING = frozenset({"missing", "not_a_file", "empty", "truncated", "not_a_checkpoint", "lfs_pointer", "torchscript",
                      "unreadable", "code_execution", "unsafe_globals", "unreadable_pickle", "over_budget",
                      "load_failed", "no_state_dict", "unsupported_tensor", "no_keys_match", "key_mismatch",
                      "crc_mismatch", "nonfinite", "integer_weights"})
"""Problem codes that make a checkpoint unusable: loading refuses it."""


def sniff_checkpoint(head: bytes, size: int) -> str:
    """Format from the first bytes: zip, safetensors, legacy_pickle, git_lfs_pointer, html, json, zeros,
    empty or unknown."""
    if size == 0:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 10 and 2 <= int.from_bytes(head[:8], "little") < 1 << 32 and head[8:].lstrip()[:1] == b"{":
        return "safetensors"  # an 8-byte header length, then a JSON object (any JSON whitespace before it)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "legacy_pickle"
    if head.startswith(b"version https://git-lfs"):
        return "git_lfs_pointer"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte order mark, then blanks
    if text[:1] == b"<":
        return "html"
    if text[:1] in (b"{", b"["):
        return "json"
    if not head.strip(b"\x00"):
        return "zeros"
    return "unknown"


_IMPOSTORS = {
    "empty": ("empty", "the file is empty (0 bytes): the copy or download failed; copy it again"),
    "git_lfs_pointer": ("lfs_pointer", "this is a git-lfs pointer, not the weights: run `git lfs pull`"),
    "html": ("not_a_checkpoint", "this is text/HTML (an error page saved as the checkpoint?); download it again"),
    "json": ("not_a_checkpoint", "this is JSON text, not weights: a download's error body, a config, or the index of "
             "a sharded checkpoint (*.index.json maps each key to its shard file: load the shards it names, each "
             "with torch.load or safetensors, and merge them); open it in a text editor to see which"),
    "zeros": ("not_a_checkpoint", "the file's first bytes are all zero: space reserved by a copy or download that "
              "never wrote the data (a full disk, an interrupted sync); copy it again from its source"),
    "unknown": ("not_a_checkpoint", "not a PyTorch zip, legacy pickle or safetensors file; check how it was produced"),
}


_AS_WEIGHTS = {
    "hdf5": "this is an HDF5 file (Keras/TensorFlow .h5 weights?), not a PyTorch checkpoint; these models need "
            "PyTorch weights",
    "onnx": "this is an ONNX model, not a PyTorch checkpoint: run it with onnxruntime, or pass the PyTorch weights it "
            "was exported from",
    "npy": "this is a NumPy array (.npy), not a checkpoint: a state dict maps each parameter's name to a tensor",
    "gzip": "this is gzip-compressed: decompress it (gunzip) and pass the checkpoint inside",
    "bzip2": "this is bzip2-compressed: decompress it (bunzip2) and pass the checkpoint inside",
    "xz": "this is xz-compressed: decompress it (unxz) and pass the checkpoint inside",
    "7z": "this is a 7-Zip archive: unpack it (7z x) and pass the checkpoint inside",
}
"""What to say of a file of these kinds (:func:`mlbench.image.other_formats.file_kind`) passed as weights."""


def _what_it_is(head: bytes) -> str | None:
    """What a file of no checkpoint format is, where its first bytes say: an image passed as the
    weights, a Keras/TensorFlow HDF5 file, an ONNX model, a NumPy array, a gzip archive."""
    image = sniff_format(head)
    if image:
        return f"this is a {image.upper()} image, not weights: was the image passed as the checkpoint?"
    return _AS_WEIGHTS.get(file_kind(head) or "")


def _is_pickle(handle: BinaryIO, limits: Budgets, deadline: Deadline) -> bool:
    """Whether a file of no known format starts with a whole pickle (protocol 0 or 1 has no marker);
    a pickle over a budget is not an impostor, its refusal is raised."""
    handle.seek(0)
    try:
        scan_pickle(handle, limits, deadline)
    except WeightsError as exc:
        if hasattr(exc, "budget"):
            raise
        return False
    return True


def _refused(exc: WeightsError, facts: FileFacts) -> None:
    code = "over_budget" if hasattr(exc, "budget") else getattr(exc, "code", "unreadable_pickle")
    facts.problems.append((code, str(exc)))
    facts.load = f"refused: {code} (nothing was unpickled)"


def inspect_file(path: Path, size: int, limits: Budgets | None = None) -> tuple[FileFacts, Any]:
    """Sniff, check within ``limits`` (the :class:`~mlbench.budgets.Budgets`), scan and (when safe)
    load a checkpoint; never runs code from the file, never opens what is not a regular file.

    Returns
    -------
    facts : FileFacts
    obj : the loaded object (dict of tensors, training dict ...) or None when it was not loaded.
    """
    limits = budgets(limits)
    facts, deadline = FileFacts(), Deadline(limits.max_seconds, WeightsError)
    try:
        with open_regular(path, WeightsError, limits.max_file_bytes) as handle:
            head = handle.read(64)
            facts.format = sniff_checkpoint(head, size)
            if facts.format == "unknown" and _is_pickle(handle, limits, deadline):
                facts.format = "legacy_pickle"  # protocol 0 or 1: torch's legacy loader would unpickle it too
            if facts.format in _IMPOSTORS:
                code, message = _IMPOSTORS[facts.format]
                facts.problems.append((code, _what_it_is(head) or message))
                return facts, None
            if facts.format == "safetensors":
                return facts, load_safetensors(handle, path, size, limits, facts)
            return facts, load_pickled(handle, size, limits, deadline, facts)
    except WeightsError as exc:
        _refused(exc, facts)
        return facts, None


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def unwrap(obj: Any, key: str | None = None, _depth: int = 0) -> tuple[Mapping[str, torch.Tensor] | None, str]:
    """The state dict inside ``obj`` and a description of where it was found.

    ``obj`` itself when it is one; else the training dict's ``key`` when given, else its first of
    ``model_state_dict``, ``state_dict`` (Lightning), ``model``, ``net``, ``weights``, else its EMA
    weights (``ema_state_dict``, ``state_dict_ema``, ``model_ema``, ``ema``) when those are all
    there is. The description names what else the dict holds (an EMA copy that was *not* used, too).
    Without ``key``, a dict with none of them is searched one level further, under its wrapper
    names (``{"model": {"state_dict": ...}}``, or a state dict with a note such as ``epoch`` in it).
    """
    if _is_state_dict(obj) and key is not None:
        return None, (f"a plain state dict, with no entry {key!r} (its {len(obj)} tensors are the weights themselves): "
                      "pass no key")
    if _is_state_dict(obj):
        return obj, "a plain state dict"
    if not isinstance(obj, Mapping):
        return None, f"a {type(obj).__name__}, not a state dict"
    keys = [key] if key is not None else [*_WRAPPERS, *_EMA_WRAPPERS]
    for name in keys:
        if _is_state_dict(obj.get(name)):
            others = sorted(str(k) for k in obj if k != name)
            ema = [k for k in _EMA_WRAPPERS if k != name and _is_state_dict(obj.get(k))]
            note = f"; EMA weights under {ema[0]!r} not used (pass key={ema[0]!r} for them)" if ema else ""
            also = f", also {others}" if others else ""
            return obj[name], f"a training dict: state dict under {name!r}{also}{note}"
    if key is None:
        found = [k for k, v in obj.items() if _is_state_dict(v) and k not in _EMA_WRAPPERS]
        if len(found) == 1:  # under a name of its own ('model_state', 'generator' ...)
            others = sorted(str(k) for k in obj if k != found[0])
            return obj[found[0]], f"a training dict: state dict under {found[0]!r} (the one entry of tensors), also {others}"
        if len(found) > 1:
            return None, (f"a dict with several state dicts, under {sorted(map(str, found))[:6]}: pass key= with the "
                          "one the model was trained as")
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors and len(tensors) >= 0.9 * len(obj):  # a state dict with a few notes saved into it
            dropped = sorted(f"{k!r} ({type(v).__name__})" for k, v in obj.items() if k not in tensors)
            return tensors, f"a state dict with {len(dropped)} entries that are not tensors, left out: {', '.join(dropped[:6])}"
        for name in [*_WRAPPERS, *_EMA_WRAPPERS] if _depth == 0 else ():
            inner, how = unwrap(obj.get(name), None, 1) if isinstance(obj.get(name), Mapping) else (None, "")
            if inner is not None:
                others = sorted(str(k) for k in obj if k != name)
                return inner, f"a training dict: under {name!r} (also {others}), {how}"
    wanted = f"no state dict under {key!r}" if key is not None else "no state dict"
    return None, f"a dict with keys {sorted(str(k) for k in obj)[:8]} but {wanted}"


def strip_prefix(state_dict: Mapping[str, Any], known_keys: Collection[str] = ()) -> tuple[OrderedDict, str]:
    """A copy of ``state_dict`` without the prefix every key shares, and that prefix.

    The usual wrappers (``module.``, ``model.``, ``net.``, ``_orig_mod.``) are stripped whenever
    every key has them, unless the keys with them fit ``known_keys`` at least as well (a user's
    model whose own attribute is ``net``); any other first segment every key shares (``encoder_decoder.``) only when
    stripping it turns the keys into ``known_keys`` (those of the registered architectures).
    """
    out, removed = OrderedDict(state_dict), ""
    known = set(known_keys)
    while out:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in out)), None)
        fit = _known(out, known) if prefix is not None and known else 0
        if fit and fit >= _known(out, known, prefix):
            break  # the keys fit the model as they are (its own attribute is called net or model)
        if prefix is None and known_keys:
            prefix = _shared_wrapper(out, known_keys)
        if prefix is None:
            break
        torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(out, prefix)
        removed += prefix
    return out, removed


OUTSIDE_WRAPPER_MOST = 8
"""The most keys that may lie outside a wrapper prefix all others share (:func:`split_wrapper`)."""


def split_wrapper(state_dict: Mapping[str, Any], known_keys: Collection[str] = ()) -> tuple[Mapping[str, Any], list[str]]:
    """``state_dict`` split into the keys under a usual wrapper prefix (``model.``, ``module.`` ...)
    and the few that are not (at most :data:`OUTSIDE_WRAPPER_MOST`, under a tenth: a Lightning
    module's loss or metric buffers, ``AveragedModel``'s ``n_averaged``), where the wrapped keys
    stripped fit ``known_keys`` better than all keys as they are; else ``(state_dict, [])``."""
    known = set(known_keys)
    for prefix in _PREFIXES:
        outside = [k for k in state_dict if not k.startswith(prefix)]
        if not outside or len(outside) > min(OUTSIDE_WRAPPER_MOST, len(state_dict) // 10):
            continue
        inside = OrderedDict((k, v) for k, v in state_dict.items() if k.startswith(prefix))
        if _known(inside, known, prefix) > _known(state_dict, known):
            return inside, outside
    return state_dict, []


def _known(keys: Iterable[str], known: Collection[str], prefix: str = "") -> int:
    """How many of ``keys``, ``prefix`` cut off, are ``known`` keys."""
    return sum(key[len(prefix):] in known for key in keys)


def _shared_wrapper(state_dict: Mapping[str, Any], known_keys: Collection[str]) -> str | None:
    """The first key segment every key shares, if without it most keys become known ones."""
    first = {key.split(".", 1)[0] for key in state_dict}
    if len(first) != 1 or not all("." in key for key in state_dict):
        return None
    prefix = first.pop() + "."
    known = set(known_keys)
    return prefix if _known(state_dict, known, prefix) > max(_known(state_dict, known), len(state_dict) // 2) else None


@dataclass
class StateDictRead:
    """A checkpoint read safely: the file's facts, the state dict found in it (or None) and every
    problem so far, as ``(code, message)``; a code in :data:`BLOCKING` makes it unusable."""

    facts: FileFacts
    state_dict: OrderedDict | None = None
    container: str = ""
    prefix: str = ""

    @property
    def problems(self) -> list[tuple[str, str]]:
        return self.facts.problems

    @property
    def blocking(self) -> list[str]:
        return [code for code, _ in self.problems if code in BLOCKING]


def read_state_dict(path: Path, size: int, known_keys: Collection[str] = (), key: str | None = None,
                    limits: Budgets | None = None) -> StateDictRead:
    """Read the state dict of a checkpoint file without running code from it.

    :func:`inspect_file` (within ``limits``, default :func:`~mlbench.budgets.budgets`), then the
    state dict unwrapped from a training dict and stripped of a wrapper prefix (``known_keys``
    lets an unusual shared prefix go too), then a NaN/Inf check.
    """
    facts, obj = inspect_file(path, size, limits)
    read = StateDictRead(facts)
    if obj is None:
        return read
    state_dict, read.container = unwrap(obj, key)
    if state_dict is None:
        facts.problems.append(("no_state_dict", f"the file holds {read.container}; expected a state dict or a "
                               "training dict with 'model_state_dict'"))
        return read
    inside, outside = split_wrapper(state_dict, known_keys)
    if outside:
        facts.problems.append(("outside_wrapper", f"{len(outside)} of {len(state_dict)} keys lie outside the wrapper "
                               f"the others share and were left out: {outside[:6]} (a loss's or metric's buffers saved "
                               "with a Lightning module, SWA's n_averaged); the model's weights are the rest"))
    read.state_dict, read.prefix = strip_prefix(inside, known_keys)
    _tensor_checks(read.state_dict, facts)
    return read


_FLOAT_NAMES = frozenset({"weight", "bias", "running_mean", "running_var", "weight_g", "weight_v", "in_proj_weight",
                          "in_proj_bias", "gamma", "beta", "scale"})
"""Names of parameters and buffers that are floating point in any model (not ``num_batches_tracked``)."""


_FINITE_CHECKED = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
"""Floating types ``torch.isfinite`` takes as they are (the float8 types it does not)."""


def _tensor_checks(state_dict: Mapping[str, torch.Tensor], facts: FileFacts) -> None:
    """Tensors a model cannot take (meta, sparse, quantized), then NaN/Inf in the plain ones."""
    odd = {k: v for k, v in state_dict.items()
           if v.layout != torch.strided or v.is_meta or v.is_quantized or v.is_nested}
    if odd:
        key, tensor = next(iter(odd.items()))
        what = ("on meta, the device of shapes without data: saved from a model never materialised" if tensor.is_meta
                else "quantized" if tensor.is_quantized
                else "a nested tensor (a list of tensors of different shapes)" if tensor.is_nested else f"{tensor.layout}")
        facts.problems.append(("unsupported_tensor", f"{len(odd)} tensor(s) are not plain dense tensors (first: {key}, "
                               f"{what}): load_state_dict cannot copy them into a model; re-save the weights as plain "
                               "tensors"))
    integer = [k for k, v in state_dict.items() if k not in odd and not (v.is_floating_point() or v.is_complex())
               and k.rsplit(".", 1)[-1] in _FLOAT_NAMES]
    if integer:
        tensor = state_dict[integer[0]]
        facts.problems.append(("integer_weights", f"{len(integer)} weight tensor(s) hold integers (first: {integer[0]}, "
                               f"{str(tensor.dtype).replace('torch.', '')}): quantised weights without their scales; "
                               "load_state_dict would cast the raw integers to float and the model output garbage. "
                               "Load them with the quantisation tool that wrote them, or save the float weights"))
    counts = {k: int((~torch.isfinite(v if v.dtype in _FINITE_CHECKED or v.is_complex() else v.float())).sum())
              for k, v in state_dict.items() if (v.is_floating_point() or v.is_complex()) and k not in odd}  # float8: via float32
    bad = {k: n for k, n in counts.items() if n}
    if bad:
        facts.problems.append(("nonfinite", f"{len(bad)} tensor(s) hold NaN or Inf, e.g. {next(iter(bad))} "
                               f"({next(iter(bad.values()))} values): the training diverged; use an earlier checkpoint"))
