"""Hostile case files, each made from a good case in a temporary folder (nothing large is in git).

As in :mod:`hostile_checkpoints`: ``FAMILIES`` maps a family to ``(variants, environment)``; a
variant is ``name -> (builder, pattern)``, the builder takes a folder and returns the case it made
there, and :func:`mlbench.load_case` must refuse it with a ``CaseError`` matching ``pattern``.
The good case is one small CBAM-ResUNet run, saved once per process and copied. Its signing key
lives in the family's folder (``MLBENCH_CASE_KEY_FILE``), never in the user's config folder.
The family runs under small case budgets (``ENV``), so a budget is met by a small file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

_MIB = 1 << 20
ENV = {"MLBENCH_MAX_CASE_MEMBER_BYTES": str(8 * _MIB), "MLBENCH_MAX_CASE_BYTES": str(32 * _MIB),
       "MLBENCH_MAX_CASE_MEMBERS": "16", "MLBENCH_MAX_CASE_MANIFEST_BYTES": str(1 * _MIB)}
"""The case budgets the family runs under."""
_TEMPLATES: dict[Path, Path] = {}


# ----- a good case, and ways to spoil it ---------------------------------------------------------

def png_bytes(side: int = 64, seed: int = 0) -> bytes:
    """A synthetic spheroid image as PNG bytes."""
    import mlbench as mb
    from PIL import Image

    image, _ = mb.make_spheroids((side, side), 2, np.random.default_rng(seed))
    buffer = io.BytesIO()
    Image.fromarray((image * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def good_case(folder: Path, name: str = "case") -> Path:
    """A copy of a good, signed case folder in ``folder`` (the key file beside the template)."""
    root = folder.parent
    os.environ.setdefault("MLBENCH_CASE_KEY_FILE", str(root / "case-signing.key"))
    if root not in _TEMPLATES:
        import mlbench as mb
        from mlbench.cases.casefile import save_case

        model = mb.build_model("cbam_resunet", "small").eval()
        run = mb.Pipeline(model, "fixed", input_size=64).start(png_bytes()).run()
        _TEMPLATES[root] = save_case(run, root / "template-case", doctor_report={})
    target = folder / name
    shutil.copytree(_TEMPLATES[root], target)
    return target


def edit_manifest(case: Path, change, *, keep_signature: bool = False) -> Path:
    """Apply ``change(meta)`` to case.json (dropping case.sig unless ``keep_signature``)."""
    meta = json.loads((case / "case.json").read_text())
    change(meta)
    (case / "case.json").write_text(json.dumps(meta, indent=1))
    if not keep_signature:
        (case / "case.sig").unlink(missing_ok=True)
    return case


def replace_file(case: Path, rel: str, data: bytes) -> Path:
    """Put ``data`` at ``rel`` and update case.json to match, unsigned: a self-consistent forgery."""
    (case / rel).write_bytes(data)

    def change(meta: dict) -> None:
        sha = hashlib.sha256(data).hexdigest()
        meta["files"][rel] = sha
        if meta["image"]["file"] == rel:
            meta["image"].update(sha256=sha, bytes=len(data))
    return edit_manifest(case, change)


def flip_byte(case: Path, rel: str, at: int = 60) -> Path:
    data = bytearray((case / rel).read_bytes())
    data[at] ^= 0xFF
    (case / rel).write_bytes(bytes(data))
    return case


def case_zip(folder: Path, members: list[tuple[zipfile.ZipInfo | str, bytes]] = (), drop: tuple[str, ...] = (),
             name: str = "case.zip") -> Path:
    """The good case as a zip, without ``drop`` and with ``members`` added (duplicates allowed)."""
    source = good_case(folder, "source")
    target = folder / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about a duplicate name: that is the point
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(source.rglob("*")):
                rel = path.relative_to(source).as_posix()
                if path.is_file() and rel not in drop:
                    archive.write(path, rel)
            for info, data in members:
                archive.writestr(info, data)
    return target


def symlink_info(name: str) -> zipfile.ZipInfo:
    """A zip entry whose Unix mode says symlink (its data is the link target)."""
    info = zipfile.ZipInfo(name)
    info.create_system, info.external_attr = 3, (stat.S_IFLNK | 0o777) << 16
    return info


def lying_zip(folder: Path) -> Path:
    """A zip with an extra entry that declares 1,000 bytes but inflates to 4 MiB of zeros."""
    target = case_zip(folder, [("filler.bin", bytes(4 * _MIB))])
    with zipfile.ZipFile(target) as archive:
        local = archive.getinfo("filler.bin").header_offset
    data = bytearray(target.read_bytes())
    data[local + 22:local + 26] = struct.pack("<I", 1000)  # the local header's uncompressed size
    central = data.index(b"PK\x01\x02", local)
    while data[central + 46:central + 46 + struct.unpack("<H", data[central + 28:central + 30])[0]] != b"filler.bin":
        central = data.index(b"PK\x01\x02", central + 4)
    data[central + 24:central + 28] = struct.pack("<I", 1000)  # the central directory's
    target.write_bytes(bytes(data))
    return target


def _in_case(folder: Path, rel: str, data: bytes | None = None, link: str | None = None, fifo: bool = False) -> Path:
    """The good case with ``rel`` written (``data``), made a symlink to ``link``, or a FIFO."""
    case = good_case(folder)
    path = case / rel
    path.unlink(missing_ok=True)
    if link is not None:
        path.symlink_to(link)
    elif fifo:
        os.mkfifo(path)
    else:
        path.write_bytes(data)
    return case


def _raw(folder: Path, data: bytes) -> Path:
    (folder / "case.zip").write_bytes(data)
    return folder / "case.zip"


def _truncated(folder: Path) -> Path:
    target = case_zip(folder)
    target.write_bytes(target.read_bytes()[:-30])
    return target


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """An .npy whose header announces ``shape`` uint8 with 16 bytes of data after it."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return header.getvalue() + bytes(16)


def mask_bomb() -> bytes:
    """outcome.npz whose mask_bits.npy is 6 MiB of zeros declaring a 200000 x 200000 mask."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("mask_bits.npy", npy_header_only((6 * _MIB,))[:-16] + bytes(6 * _MIB))
        shape = io.BytesIO()
        np.save(shape, np.array([200_000, 200_000], dtype=np.int64))
        archive.writestr("shape.npy", shape.getvalue())
    return buffer.getvalue()


def zeros_png(side: int) -> bytes:
    """A black ``side`` x ``side`` grey PNG, compressed to a few kB."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_announcing(height: int, width: int) -> bytes:
    """A valid small PNG whose header (and CRC) announce ``height`` x ``width``."""
    data = bytearray(zeros_png(8))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _option(name: str, value) -> callable:
    return lambda f: edit_manifest(good_case(f), lambda m: m["options"].__setitem__(name, value))


def _deep(levels: int) -> callable:
    return lambda f: _write_manifest(good_case(f), b'{"format": "mlbench-case/1", "x": ' + b"[" * levels + b"]" * levels + b"}")


def _write_manifest(case: Path, data: bytes) -> Path:
    (case / "case.json").write_bytes(data)
    (case / "case.sig").unlink(missing_ok=True)
    return case


def _family() -> dict:
    listed, resize = r"not listed in case\.json", r"max_replay_bytes"
    return {
        "edited_image": (lambda f: flip_byte(good_case(f), "image.png"), r"image\.png has sha256 .* but case\.json records"),
        "edited_preview": (lambda f: flip_byte(good_case(f), "previews/decoded.png", 40), r"decoded\.png has sha256"),
        "edited_mask": (lambda f: flip_byte(good_case(f), "outcome.npz", 70), r"outcome\.npz has sha256"),
        "edited_signed_manifest": (lambda f: edit_manifest(good_case(f), lambda m: m.__setitem__("note", "edited"),
                                                           keep_signature=True), r"case\.json was changed after"),
        "emptied_file_list": (lambda f: edit_manifest(good_case(f), lambda m: m.__setitem__("files", {})),
                              r"does not list \['image\.png', 'outcome\.npz'\]"),
        "unlisted_file": (lambda f: _in_case(f, "notes.txt", b"x"), listed),
        "garbage_signature": (lambda f: _in_case(f, "case.sig", b"{oops"), r"case\.sig is not a JSON signature"),
        "symlink_in_folder": (lambda f: _in_case(f, "previews/decoded.png", link="/etc/passwd"),
                              r"is a symlink to '/etc/passwd'"),
        "fifo_in_folder": (lambda f: _in_case(f, "previews/pipe.png", fifo=True), r"is a FIFO"),
        "symlink_member": (lambda f: case_zip(f, [(symlink_info("previews/passwd.png"), b"/etc/passwd")]), r"is a symlink"),
        "dotdot_member": (lambda f: case_zip(f, [("previews/../../escape.png", b"x")]), r"leaves the case"),
        "absolute_member": (lambda f: case_zip(f, [("/etc/cron.d/case", b"x")]), r"is an absolute path"),
        "backslash_member": (lambda f: case_zip(f, [("previews\\..\\x.png", b"x")]), r"has a backslash"),
        "drive_letter_member": (lambda f: case_zip(f, [("C:/x.png", b"x")]), r"has a drive letter"),
        "duplicate_member": (lambda f: case_zip(f, [("image.png", png_bytes(64, 1))]), r"more than once"),
        "zip_bomb_member": (lambda f: case_zip(f, [("previews/bomb.png", bytes(64 * _MIB))]),
                            r"declares .* exceeds the budget max_case_member_bytes"),
        "member_lying_about_size": (lying_zip, r"damaged|CRC"),
        "too_many_members": (lambda f: case_zip(f, [(f"previews/p{i}.png", b"x") for i in range(40)]), r"max_case_members"),
        "not_a_zip": (lambda f: _raw(f, b"PK\x03\x04" + bytes(200)), r"neither a case folder nor a zip"),
        "truncated_zip": (_truncated, r"neither a case folder nor a zip|damaged"),
        "huge_manifest": (lambda f: edit_manifest(good_case(f), lambda m: m.__setitem__("note", "x" * 2 * _MIB)),
                          r"max_case_manifest_bytes"),
        "garbage_json": (lambda f: _write_manifest(good_case(f), b'{"format": "mlbench-case/1", '), r"not valid JSON"),
        "non_utf8_manifest": (lambda f: _write_manifest(good_case(f), '{"format": "mlbench-case/1", "note": "é"}'.encode("latin-1")),
                              r"not UTF-8 text \(byte 0xe9"),
        "deep_json_recursion": (_deep(200_000), r"nests deeper than Python can parse"),
        "deep_json": (_deep(40), r"nests more than 32 levels"),
        "manifest_not_an_object": (lambda f: _write_manifest(good_case(f), b"[1, 2]"), r"has format None|not an object"),
        "missing_outcome": (lambda f: edit_manifest(good_case(f), lambda m: m.pop("outcome")), r"case\.json\.outcome is missing"),
        "huge_input_size": (_option("input_size", 8192), r"input_size=8192 .* exceeds the budget max_decoded_bytes"),
        "negative_threshold": (_option("threshold", -0.5), r"threshold=-0\.5 is outside \(0, 1\)"),
        "input_size_not_a_number": (_option("input_size", "big"), r"option input_size=str 'big' is not an integer or null"),
        "unknown_option": (_option("treshold", 0.3), r"unknown option 'treshold'"),
        "model_from_a_path": (lambda f: edit_manifest(good_case(f), lambda m: m["model"].__setitem__("architecture", "/etc/passwd")),
                              r"not one of mlbench's"),
        "mask_bomb": (lambda f: replace_file(good_case(f), "outcome.npz", mask_bomb()), r"outcome\.npz"),
        "image_pixel_bomb": (lambda f: replace_file(good_case(f), "image.png", png_announcing(20_000, 20_000)),
                             r"exceeds the limit of 64,000,000"),
        "replay_memory_bomb": (lambda f: edit_manifest(replace_file(good_case(f), "image.png", zeros_png(4096)),
                                                       lambda m: m["options"].__setitem__("resize", "none")), resize),
    }


FAMILIES = {"cases": (_family, ENV)}
"""family -> (variants, environment with the budgets it runs under)."""


def probe_case(path: Path, pattern: str, raises, wrong: type[Exception]) -> str:
    """``load_case`` refuses ``path`` with a CaseError matching ``pattern``; without the replay it
    refuses it too, or (for a replay over budget) returns the case."""
    from mlbench.cases.casefile import CaseError, load_case

    message = raises(lambda: load_case(path), CaseError, pattern, "load_case")
    try:
        load_case(path, replay=False)
    except CaseError:
        pass
    except Exception as exc:  # noqa: BLE001 - any other escape is the finding
        raise wrong(f"load_case(replay=False): {type(exc).__name__}: {str(exc)[:300]}") from None
    return message
