"""Hostile checkpoints, each built in a few lines in a temporary folder (nothing large is in git).

Every builder takes the folder and returns the path it wrote. ``FAMILIES`` maps a family (a class
of defect) to its variants: ``name -> (builder, pattern)``; ``pattern`` is a regex the refusal's
message must match (it names the budget or the defect). ``ENV`` gives the budgets a family runs
under (small ones, so that a budget is met by a small file).
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

MARKER = "PAYLOAD_RAN"
"""The file a payload would create next to the checkpoint: it must never exist."""


def _text(value: str) -> bytes:
    """BINUNICODE of ``value``."""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _zip(folder: Path, name: str, pickle_bytes: bytes, extra: dict[str, bytes] | None = None) -> Path:
    """A checkpoint laid out as torch.save writes one, with ``pickle_bytes`` as its data.pkl."""
    path = folder / name
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle_bytes)
        archive.writestr("archive/byteorder", "little")
        for member, data in (extra or {}).items():
            archive.writestr(member, data)
        archive.writestr("archive/version", "3\n")
    return path


def _legacy(folder: Path, name: str, pickle_bytes: bytes) -> Path:
    path = folder / name
    path.write_bytes(pickle_bytes)
    return path


def _both(pickle_of):
    """A zip and a legacy variant of the pickle ``pickle_of(folder)`` writes."""
    return (lambda f: _zip(f, "w.pth", pickle_of(f)), lambda f: _legacy(f, "w.pth", pickle_of(f)))


# ----- code execution in every opcode form -------------------------------------------------------

def _command(folder: Path) -> str:
    return f"touch {folder / MARKER}"


def _global(module: str, name: str, argument: bytes, proto: bytes = b"\x80\x02") -> callable:
    return lambda f: proto + f"c{module}\n{name}\n".encode() + argument(f) + b"\x85R."


def _short_binstring(value: str) -> bytes:
    return b"U" + bytes([len(value)]) + value.encode()


CODE_FORMS = {
    "global_posix_system": _global("posix", "system", lambda f: _text(_command(f))),
    "global_builtins_exec": _global("builtins", "exec", lambda f: _text(f"open({str(f / MARKER)!r}, 'w')")),
    "global_py2_builtin_eval": _global("__builtin__", "eval", lambda f: _text(f"open({str(f / MARKER)!r}, 'w')")),
    "inst_protocol0": lambda f: b"\x80\x02(S'" + _command(f).encode() + b"'\nios\nsystem\n.",
    "stack_global_unicode": lambda f: b"\x80\x04\x8c\x02os\x8c\x06system\x93" + _text(_command(f)) + b"\x85R.",
    "stack_global_short_binstring": lambda f: (b"\x80\x04" + _short_binstring("os") + _short_binstring("system")
                                               + b"\x93" + _text(_command(f)) + b"\x85R."),
    "stack_global_binbytes": lambda f: b"\x80\x04C\x02osC\x06system\x93" + _text(_command(f)) + b"\x85R.",
    "stack_global_from_memo": lambda f: (b"\x80\x04\x8c\x02os\x94\x8c\x06system\x9400h\x00h\x01\x93"
                                         + _text(_command(f)) + b"\x85R."),
    "obj_after_stack_global": lambda f: (b"\x80\x04(\x8c\nsubprocess\x8c\x05Popen\x93(" + _text("touch")
                                         + _text(str(f / MARKER)) + b"lo."),
    "newobj_subprocess": lambda f: b"\x80\x02csubprocess\nPopen\n]" + _text(_command(f)) + b"a\x85\x81.",
    "newobj_ex_nt": lambda f: b"\x80\x04cnt\nsystem\n" + _text(_command(f)) + b"\x85}\x92.",
    "extension_code": lambda f: b"\x80\x02\x82\x07" + _text(_command(f)) + b"\x85R.",
    "computed_name": lambda f: (b"\x80\x04\x8c\x02osc_codecs\nencode\n" + _text("system") + _text("latin1")
                                + b"\x86R\x93" + _text(_command(f)) + b"\x85R."),
}


def _code_family() -> dict:
    family = {}
    for form, pickle_of in CODE_FORMS.items():
        as_zip, as_legacy = _both(pickle_of)
        family[f"zip_{form}"] = (as_zip, r"code_execution")
        family[f"legacy_{form}"] = (as_legacy, r"code_execution")
    return family


# ----- nesting depth ------------------------------------------------------------------------------

def _deep(n: int) -> dict:
    return {
        "tuple_key_200k": lambda f: b"\x80\x02}K\x01" + b"\x85" * 200_000 + b"K\x02s.",
        "tuple_mark": lambda f: b"\x80\x02" + b"(" * n + b"t" * n + b".",
        "lists_append": lambda f: b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".",
        "frozensets": lambda f: b"\x80\x04" + b"(" * n + b"\x91" * n + b".",
        "dict_values": lambda f: b"\x80\x02" + b"}K\x01" * n + b"N" + b"s" * n + b".",
        "tuple_key_in_training_dict": lambda f: (b"\x80\x02}(" + _text("epoch") + b"K\x07" + _text("model_state_dict")
                                                 + b"}K\x01" + b"\x85" * n + b"K\x02su."),
    }


def _depth_family() -> dict:
    family = {}
    for form, pickle_of in _deep(5_000).items():
        as_zip, as_legacy = _both(pickle_of)
        family[f"zip_{form}"] = (as_zip, r"max_pickle_depth")
        family[f"legacy_{form}"] = (as_legacy, r"max_pickle_depth")
    late = lambda f: b"\x80\x02]q\x00]q\x01h\x01h\x00ah\x00Na."  # noqa: E731  L0 filled after it went into L1
    family["zip_filled_after_placed"] = (lambda f: _zip(f, "w.pth", late(f)), r"filled after it was placed")
    return family


# ----- expanded size, opcodes, memo, stack ----------------------------------------------------------

PICKLE_ENV = {"MLBENCH_MAX_PICKLE_OPS": "100000", "MLBENCH_MAX_PICKLE_MEMO": "20000"}


def _bombs() -> dict:
    return {
        "shared_tuples_100": (lambda f: b"\x80\x02N" + b"q\x00h\x00\x86" * 100 + b".", r"max_pickle_objects"),
        "shared_tuples_25": (lambda f: b"\x80\x02N" + b"q\x00h\x00\x86" * 25 + b".", r"max_pickle_objects"),
        "shared_lists_60": (lambda f: b"\x80\x02N" + b"q\x00](h\x00h\x00e" * 60 + b".", r"max_pickle_objects"),
        "shared_dicts_60": (lambda f: b"\x80\x02N" + b"q\x00}(K\x01h\x00K\x02h\x00u" * 60 + b".",
                            r"max_pickle_objects"),
        "opcodes": (lambda f: b"\x80\x02" + b"N0" * 200_000 + b"N.", r"max_pickle_ops"),
        "memo_entries": (lambda f: b"\x80\x02N" + b"".join(b"r" + struct.pack("<I", i) for i in range(30_000))
                         + b".", r"max_pickle_memo"),
        "stack_entries": (lambda f: b"\x80\x02" + b"N" * 30_000 + b".", r"max_pickle_memo"),
        "marks": (lambda f: b"\x80\x02" + b"(" * 30_000 + b"N.", r"max_pickle_memo"),
    }


def _bomb_family() -> dict:
    family = {}
    for form, (pickle_of, pattern) in _bombs().items():
        as_zip, as_legacy = _both(pickle_of)
        family[f"zip_{form}"] = (as_zip, pattern)
        family[f"legacy_{form}"] = (as_legacy, pattern)
    return family


# ----- zip members: declared and actual sizes, counts ----------------------------------------------

def _zeros_deflate(mebibytes: int) -> bytes:
    """A raw deflate stream of ``mebibytes`` MiB of zeros, built from one repeated 1 MiB block."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    unit = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
    return first + unit * (mebibytes - 1) + packer.flush(zlib.Z_FINISH)


def _raw_zip(path: Path, members: list[tuple[str, int, int, bytes]], bad_crc: bool = False) -> Path:
    """A zip written by hand: ``(name, method, declared size, data)`` per member; a stored member has
    its true CRC (unless ``bad_crc``), a deflated one CRC 0 (never read that far)."""
    out, directory = io.BytesIO(), b""
    for name, method, declared, data in members:
        offset, raw = out.tell(), name.encode()
        crc = zlib.crc32(data) ^ bad_crc if method == 0 else 0
        big = declared >= 1 << 32  # zip64: the sizes move into an extra field
        sizes = (0xFFFFFFFF, 0xFFFFFFFF) if big else (len(data), declared)
        extra = struct.pack("<HHQQ", 1, 16, declared, len(data)) if big else b""
        out.write(b"PK\x03\x04" + struct.pack("<HHHHHIIIHH", 45, 0, method, 0, 0, crc, *sizes, len(raw), len(extra))
                  + raw + extra + data)
        directory += (b"PK\x01\x02" + struct.pack("<HHHHHHIIIHHHHHII", 45, 45, 0, method, 0, 0, crc, *sizes,
                                                  len(raw), len(extra), 0, 0, 0, 0, offset) + raw + extra)
    start = out.tell()
    out.write(directory + b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, len(members), len(members),
                                                        len(directory), start, 0))
    path.write_bytes(out.getvalue())
    return path


def _zip_bombs(folder: Path, name: str, declared: int, actual_mib: int, copies: int) -> Path:
    stream = _zeros_deflate(actual_mib)
    members = [("archive/data.pkl", 0, 2, b"N.")] + [(f"archive/data/{i}", 8, declared, stream)
                                                      for i in range(copies)]
    return _raw_zip(folder / name, members)


ZIP_ENV = {"MLBENCH_MAX_TENSORS": "500"}


def _zip_family() -> dict:
    gib = 1 << 30
    return {
        "members_declare_10gib": (lambda f: _zip_bombs(f, "w.pth", 10 * gib, 16, 3), r"max_decompressed_bytes"),
        "one_member_declares_3gib": (lambda f: _zip_bombs(f, "w.pth", 3 * gib, 8, 1), r"max_decompressed_bytes"),
        "many_members_600mib": (lambda f: _zip_bombs(f, "w.pth", 600 << 20, 4, 4), r"max_decompressed_bytes"),
        "member_lies_small": (lambda f: _zip_bombs(f, "w.pth", 1000, 64, 1), r"CRC|crc"),
        "stored_declares_5gib": (lambda f: _raw_zip(f / "w.pth", [("archive/data.pkl", 0, 5 * gib, b"N.")]),
                                 r"max_decompressed_bytes"),
        "member_count": (lambda f: _zip(f, "w.pth", b"\x80\x02N.", {f"archive/data/{i}": b"" for i in range(600)}),
                         r"max_tensors"),
        "pickle_member_crc": (lambda f: _raw_zip(f / "w.pth", [("archive/data.pkl", 0, 2, b"N.")], True), r"CRC"),
    }


# ----- tensor counts and declared storage ----------------------------------------------------------

def _safetensors(folder: Path, count: int) -> Path:
    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(count)}
    raw = json.dumps(header).encode()
    path = folder / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def _many_tensors_pickle(count: int) -> bytes:
    """A dict of ``count`` empty tensors sharing one storage (memo entry 0)."""
    pid = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu") + b"K\x00tQq\x00"
    items = [_text(str(i)) + b"ctorch._utils\n_rebuild_tensor_v2\n(" + (pid if i == 0 else b"h\x00")
             + b"K\x00K\x00\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs" for i in range(count)]
    return b"\x80\x02}" + b"".join(items) + b"."


def _storage_numel(numel: int) -> bytes:
    pid = b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu") + b"J" + struct.pack("<i", numel)
    return (b"\x80\x02}" + _text("w") + b"ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"tQK\x00K\x02\x85K\x01\x85\x89"
            + b"ccollections\nOrderedDict\n)RtRs.")


TENSOR_ENV = {"MLBENCH_MAX_TENSORS": "1000", "MLBENCH_MAX_DECOMPRESSED_BYTES": "1000000000"}


def _tensor_family() -> dict:
    return {
        "safetensors_5000_empty": (lambda f: _safetensors(f, 5000), r"max_tensors"),
        "zip_2000_tensors": (lambda f: _zip(f, "w.pth", _many_tensors_pickle(2000)), r"max_tensors"),
        "legacy_2000_tensors": (lambda f: _legacy(f, "w.pth", _many_tensors_pickle(2000)), r"max_tensors"),
        "zip_storage_8gb": (lambda f: _zip(f, "w.pth", _storage_numel(2**31 - 1)), r"max_decompressed_bytes"),
        "legacy_storage_past_the_file": (lambda f: _legacy(f, "w.pth", _storage_numel(1000)),
                                         r"declares 4,000 bytes of tensor data but the file has only"),
        "meta_tensor": (lambda f: _torch_save(f, {"a": "meta"}), r"not plain dense tensors .* on meta"),
        "sparse_tensor": (lambda f: _torch_save(f, {"a": "sparse"}), r"not plain dense tensors .*sparse_coo"),
    }


def _torch_save(folder: Path, kinds: dict[str, str]) -> Path:
    """A checkpoint of tensors a model cannot take (each kind one of ``meta``, ``sparse``)."""
    import torch

    made = {"meta": lambda: torch.zeros(3, device="meta"), "sparse": lambda: torch.eye(3).to_sparse()}
    torch.save({key: made[kind]() for key, kind in kinds.items()} | {"b": torch.zeros(2)}, folder / "w.pth")
    return folder / "w.pth"


FAMILIES = {"code_pickle": (_code_family, {}), "deep_pickle": (_depth_family, {}),
            "pickle_bomb": (_bomb_family, PICKLE_ENV), "zip_bomb": (_zip_family, ZIP_ENV),
            "many_tensors": (_tensor_family, TENSOR_ENV)}
"""family -> (variants, environment with the budgets it runs under)."""
