"""Isolation: run a native parser in a child process with a memory and a time limit.

Header checks bound what a decoder is asked to do, but the decoder itself (libpng, libtiff,
libjpeg, OpenCV's codecs) is native code: a file crafted for one of its bugs can crash it or make
it allocate without end, and in a notebook the process it crashes is the kernel. Calls made
through :func:`call_isolated` run in one long-lived child process instead: on each call the child
limits its own address space (``RLIMIT_AS``: its size at that moment plus the ``max_decoder_memory``
budget), the parent waits at most ``max_seconds`` for the answer and kills the child past it,
and a child that dies (a signal, an out-of-memory abort) is reported by name and replaced on the
next call. This process is never touched.

The child starts in about 0.15 s: it does not run ``mlbench/__init__.py`` (which imports torch)
but registers the package's folder and imports only the module it is asked for. Arrays in the
answer travel as raw bytes, not pickled copies; warnings raised in the child are raised again
here. One call at a time (a lock), so a pool of threads shares the child in turn.

:func:`isolate_default` reads ``MLBENCH_ISOLATE_DECODERS`` (``1`` puts every
:func:`mlbench.read_image` into the child). :func:`die_with_parent` ends a child process when
the process that started it dies, even by ``kill -9``.
"""

from __future__ import annotations

import atexit
import importlib
import io
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

from mlbench.errors import MlbenchError, OptionsError

__all__ = ["call_isolated", "isolate_default", "die_with_parent", "WATCHDOG_SECONDS", "ChildProcess", "address_space",
           "limit_address_space"]

WATCHDOG_SECONDS = 0.5
"""How often a child's watchdog thread checks that its parent is alive."""

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_START_SECONDS = 60.0  # the child's own start-up (imports) on a loaded machine; not charged to a call
_FRAME = struct.Struct("<Q")
_BOOT = ("import sys, types\n"
         "package = types.ModuleType('mlbench'); package.__path__ = [sys.argv[1]]; sys.modules['mlbench'] = package\n"
         "from mlbench.isolation import _child_main\n"
         "_child_main()\n")


def die_with_parent(parent: int | None = None) -> None:
    """End this process when the process that started it dies.

    On Linux, asks the kernel to send SIGKILL when the parent (the thread that started this
    process) dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes; nothing happens where ``prctl`` is
    missing), and everywhere starts a daemon thread that ends this process with ``os._exit`` once
    its parent changed (it was re-parented: its parent died). ``parent`` is the pid this process
    must have as parent; when it is already gone, the process ends at once. Used as the
    initializer of the sweep's process pools and by the isolation child.
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl: the watchdog alone
            pass
    expected = os.getppid()
    if parent is not None and expected != parent:  # the parent died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_SECONDS)
            if os.getppid() != expected:
                os._exit(1)

    threading.Thread(target=watch, name="mlbench-parent-watchdog", daemon=True).start()


def isolate_default() -> bool:
    """Whether :func:`mlbench.read_image` decodes in the child process when its caller did not say:
    the environment variable ``MLBENCH_ISOLATE_DECODERS`` (``1``/``true``/``yes`` or ``0``/``false``/``no``;
    unset means no: the in-process decode is 2-50x faster for small images, and its header checks
    already bound what the decoder is asked to do)."""
    value = os.environ.get("MLBENCH_ISOLATE_DECODERS", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise OptionsError(f"environment variable MLBENCH_ISOLATE_DECODERS={value!r} is not a yes or no; set it to 1 "
                       "(decode every image in a child process) or 0 (in this process), or unset it")


class ChildProcess:
    """The long-lived child that runs isolated calls (started on the first call, replaced after a
    crash or a timeout). Most code uses the shared one through :func:`call_isolated`."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked process: the parent's child and lock are the parent's; start afresh."""
        self._process, self._lock = None, threading.Lock()

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before the first call or after a failed one)."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def call(self, target: str, args: tuple, kwargs: dict, *, memory_bytes: int, seconds: float,
             error: type[MlbenchError], what: str) -> Any:
        """``target(*args, **kwargs)`` in the child (``target`` as ``"package.module:function"``).

        Returns what the function returned (a top-level tuple's numpy arrays sent as raw bytes).
        Raises the function's own :class:`~mlbench.errors.MlbenchError` as it was raised; ``error``
        (with ``budget`` set) when the call needs more than ``memory_bytes`` of new address space,
        runs past ``seconds`` (the child is killed) or crashes the child; ``error`` naming the
        exception for any other exception.
        """
        with self._lock:
            process = self._running()
            started = time.monotonic()
            job = pickle.dumps((target, args, kwargs, int(memory_bytes), os.getcwd()), protocol=5)
            try:
                process.stdin.write(_FRAME.pack(len(job)) + job)
                process.stdin.flush()
                status, payload, arrays = _read_answer(process, started + seconds)
            except _TimedOut:
                self._stop()
                from mlbench.budgets import budget_error

                raise budget_error(error, "max_seconds", seconds, f"{what} (in its child process, now stopped) took "
                                   "too long", round(time.monotonic() - started, 1), " s") from None
            except (EOFError, BrokenPipeError, OSError):
                raise self._death(error, what, memory_bytes) from None
        for category, message in payload.pop("warnings", []) if status == "ok" else []:
            warnings.warn(message, _warning_class(category), stacklevel=3)
        if status == "ok":
            return _with_arrays(payload["result"], arrays)
        raise _child_error(payload, error, what, memory_bytes)

    def _running(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is None:
            return self._process
        package = os.path.dirname(os.path.abspath(__file__))
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        process = subprocess.Popen([sys.executable, "-c", _BOOT, package], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, env=environment, close_fds=True)
        try:
            status, _, _ = _read_answer(process, time.monotonic() + _START_SECONDS)
        except (_TimedOut, EOFError, OSError):
            status = "dead"
        if status != "ready":
            process.kill()
            process.wait()
            raise OptionsError(f"the isolation child process did not start ({sys.executable}, exit status "
                               f"{process.returncode}); its error is on stderr. Decode in this process instead "
                               "(isolate=False, or MLBENCH_ISOLATE_DECODERS=0)")
        self._process = process
        return process

    def _stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait()
            for stream in (process.stdin, process.stdout):
                stream.close()

    def _death(self, error: type[MlbenchError], what: str, memory_bytes: int) -> MlbenchError:
        """The error for a child that died during a call (it is reaped; the next call starts another)."""
        process = self._process
        process.wait()
        code = process.returncode
        self._stop()
        how = (f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_
               else f"exit status {code}")
        if code == -signal.SIGKILL:
            how += ": the kernel's out-of-memory killer, a user, or the end of the thread that started it"
        exc = error(f"{what} crashed the child process it ran in ({how}); this process is unaffected. "
                    f"A decoder that crashes on a file is a damaged file or one crafted against it: do not open "
                    f"it with other readers in this process; export it again from its source (if the child ran "
                    f"out of its memory budget, max_decoder_memory = {memory_bytes:,} bytes, raise it: "
                    "budgets=Budgets(max_decoder_memory=...) or MLBENCH_MAX_DECODER_MEMORY)")
        exc.budget = None
        return exc


class _TimedOut(Exception):
    pass


_SHARED = ChildProcess()
atexit.register(_SHARED._stop)


def call_isolated(target: str, args: tuple = (), kwargs: dict | None = None, *, memory_bytes: int, seconds: float,
                  error: type[MlbenchError], what: str) -> Any:
    """Run ``target`` (``"package.module:function"``) in the shared child process; see
    :meth:`ChildProcess.call` for what it returns and raises.

    Examples
    --------
    >>> from mlbench.errors import ImageError
    >>> call_isolated("math:hypot", (3, 4), memory_bytes=1 << 28, seconds=30, error=ImageError, what="a sum")
    5.0
    >>> call_isolated("ctypes:string_at", (0,), memory_bytes=1 << 28, seconds=30, error=ImageError,
    ...               what="reading address 0")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mlbench.errors.ImageError: reading address 0 crashed the child process it ran in (signal SIGSEGV); ...
    """
    return _SHARED.call(target, args, kwargs or {}, memory_bytes=memory_bytes, seconds=seconds, error=error, what=what)


def _warning_class(name: str) -> type[Warning]:
    """The builtin warning class of that name (a library's own class becomes UserWarning)."""
    import builtins

    found = getattr(builtins, name, None)
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning


def _child_error(payload: dict, error: type[MlbenchError], what: str, memory_bytes: int) -> MlbenchError:
    """The exception the child reported, rebuilt here."""
    if payload["memory"]:
        exc = error(f"{what}: its memory exceeds the budget max_decoder_memory = {memory_bytes:,} bytes of new "
                    "address space in its child process (nothing in this process was affected); if you trust "
                    "the file, raise it: budgets=Budgets(max_decoder_memory=...) from mlbench.budgets, or the "
                    "environment variable MLBENCH_MAX_DECODER_MEMORY")
        exc.budget = "max_decoder_memory"
        return exc
    import mlbench.errors

    found = getattr(mlbench.errors, payload["type"], None) if payload["module"] == "mlbench.errors" else None
    if isinstance(found, type) and issubclass(found, MlbenchError):
        exc = found(payload["message"])
        if payload["budget"] is not None:
            exc.budget = payload["budget"]
        return exc
    return error(f"{what} failed in its child process ({payload['type']}: {payload['message'][:300]})")


def _with_arrays(result: Any, arrays: list) -> Any:
    if not arrays:
        return result
    return tuple(arrays.pop(0) if isinstance(item, _ArraySlot) else item for item in result)


class _ArraySlot:
    """Where a top-level array of the answer goes; its bytes follow the pickled answer."""

    def __init__(self, dtype: str, shape: tuple[int, ...]) -> None:
        self.dtype, self.shape = dtype, shape


def _read_answer(process: subprocess.Popen, deadline: float) -> tuple[str, dict, list]:
    """One framed answer from the child: ``(status, payload, arrays)``; _TimedOut past ``deadline``,
    EOFError when the child closed its end (it died)."""
    stream = process.stdout
    header = pickle.loads(_read_exact(stream, _FRAME.unpack(_read_exact(stream, _FRAME.size, deadline))[0], deadline))
    status, payload = header
    arrays = []
    if status == "ok":
        import numpy as np

        result = payload["result"]
        for slot in (result if isinstance(result, tuple) else ()):
            if isinstance(slot, _ArraySlot):
                array = np.empty(slot.shape, dtype=np.dtype(slot.dtype))
                _read_exact(stream, array.nbytes, deadline, into=memoryview(array.reshape(-1)).cast("B"))
                arrays.append(array)
    return status, payload, arrays


def _read_exact(stream, size: int, deadline: float, into: memoryview | None = None) -> bytes:
    """``size`` bytes from the child's stdout, waiting at most until ``deadline``."""
    view = into if into is not None else memoryview(bytearray(size))
    raw = io.FileIO(stream.fileno(), closefd=False)
    done = 0
    while done < size:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([raw], [], [], left)[0]:
            raise _TimedOut()
        count = raw.readinto(view[done:size])
        if not count:
            raise EOFError("the child process closed its answer")
        done += count
    return view.tobytes() if into is None else b""


# ---------------------------------------------------------------- the child's side


def _child_main() -> None:
    """The child: answer jobs from stdin on a private copy of stdout, until stdin closes."""
    import resource

    die_with_parent()
    jobs, answers = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print from a decoder must not corrupt the answers
    _send(answers, ("ready", {}), ())
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    while True:
        head = jobs.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        target, args, kwargs, memory_bytes, cwd = pickle.loads(jobs.read(_FRAME.unpack(head)[0]))
        os.chdir(cwd)
        limit_address_space(memory_bytes)
        try:
            status, payload, arrays = _run_job(target, args, kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
        _send(answers, (status, payload), arrays)


def address_space() -> int:
    """This process's virtual size in bytes (what RLIMIT_AS counts), from ``/proc/self/statm``."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def limit_address_space(extra_bytes: int) -> int:
    """Let this process grow by at most ``extra_bytes`` of address space from now on (``RLIMIT_AS``,
    soft limit; never above the hard one): an allocation past it fails with ``MemoryError`` (a
    ``RuntimeError`` from torch's allocator) instead of taking the machine's memory. Returns the
    limit set, in bytes. Used by the isolation child per call and by the service's worker processes."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    limit = address_space() + int(extra_bytes)
    limit = limit if hard == resource.RLIM_INFINITY else min(hard, limit)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return limit


def _run_job(target: str, args: tuple, kwargs: dict) -> tuple[str, dict, list]:
    import numpy as np

    module, _, name = target.partition(":")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = getattr(importlib.import_module(module), name)(*args, **kwargs)
    except BaseException as exc:  # everything goes back to the parent, which decides
        memory = isinstance(exc, MemoryError) or isinstance(exc.__cause__, MemoryError)
        return "error", {"module": type(exc).__module__, "type": type(exc).__qualname__, "message": str(exc),
                         "budget": getattr(exc, "budget", None), "memory": memory}, []
    arrays = []
    if isinstance(result, tuple):
        slots = []
        for item in result:
            if isinstance(item, np.ndarray) and item.dtype != object:
                arrays.append(np.ascontiguousarray(item))
                slots.append(_ArraySlot(item.dtype.str, item.shape))
            else:
                slots.append(item)
        result = tuple(slots)
    found = [(type(w.message).__name__, str(w.message)) for w in caught]
    return "ok", {"result": result, "warnings": found}, arrays


def _send(stream, answer: tuple, arrays) -> None:
    data = pickle.dumps(answer, protocol=5)
    stream.write(_FRAME.pack(len(data)) + data)
    for array in arrays:
        stream.write(memoryview(array.reshape(-1)).cast("B"))
    stream.flush()
