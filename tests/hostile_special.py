"""Paths that are not regular files: FIFOs, devices, sockets, directories and symlinks to them.

Each builder makes the path in a temporary folder and returns it; reading one could block
forever (a FIFO) or never end (``/dev/zero``). Every reader must refuse it before opening it,
saying what it is, and never say "does not exist" (except for a broken symlink, where it is true).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def _fifo(folder: Path, name: str = "w.pth") -> Path:
    path = folder / name
    os.mkfifo(path)
    return path


def _link(folder: Path, target: str | Path, name: str = "w.pth") -> Path:
    path = folder / name
    path.symlink_to(target)
    return path


def _socket(folder: Path) -> Path:
    path = folder / "w.pth"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.close()  # the socket file stays
    return path


def _special_family() -> dict:
    return {
        "fifo": (_fifo, r"is a FIFO"),
        "fifo_named_like_an_image": (lambda f: _fifo(f, "a.png"), r"is a FIFO"),
        "symlink_to_fifo": (lambda f: _link(f, _fifo(f, "pipe")), r"symlink to .*pipe.*, which is a FIFO"),
        "symlink_to_dev_zero": (lambda f: _link(f, "/dev/zero"), r"'/dev/zero', which is a character device"),
        "symlink_to_dev_urandom": (lambda f: _link(f, "/dev/urandom"), r"which is a character device"),
        "symlink_to_dev_null": (lambda f: _link(f, "/dev/null"), r"which is a character device"),
        "socket": (_socket, r"is a socket"),
        "directory": (lambda f: (f / "w.pth").mkdir() or f / "w.pth", r"is a directory"),
        "symlink_to_directory": (lambda f: _link(f, f), r"which is a directory"),
        "broken_symlink": (lambda f: _link(f, f / "gone.pth"), r"symlink to .*gone.pth.*which does not exist"),
    }


FAMILIES = {"special_file": (_special_family, {})}
"""family -> (variants, environment with the budgets it runs under)."""
