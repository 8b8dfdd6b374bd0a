"""Calls around every submodule's forward, in one place, always removed.

:func:`module_calls` runs every call of a submodule of ``model`` through ``around(module, call,
args, kwargs)`` while the block runs, then removes itself and restores ``model.training`` in a
``finally``, even when the forward raises. The probes build on it: shape traces directly, memory
timelines and estimates through ``ModuleStack.track``.

It does not use PyTorch's hooks. Any forward hook, even a global one, sends every module call
through ``Module._call_impl``'s slow path; on the small HRNet (1,363 module calls per forward)
two no-op global hooks alone cost 10 to 25% of a 256 px forward, more than the 15% a trace may
cost in all. Instead, one dispatcher stands in for ``nn.Module.__call__`` while any block is
active: a call of a module outside the traced models costs one dictionary lookup. For a traced
module, ``around`` gets as ``call`` what PyTorch's own ``__call__`` would end in: the class's
``forward`` itself when the module has no hooks, no compiled or per-instance forward and no JIT
trace is running (``_call_impl``'s fast path, without its two Python frames: those frames were
5% of a small HRNet forward), else PyTorch's ``__call__`` unchanged (per-module hooks such as
the service's cancel hooks still fire).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from types import FunctionType
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from mlbench.errors import OptionsError

CallAround = Callable[[nn.Module, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]

plain_torch = getattr(torch._C, "DisableTorchFunction", nullcontext)
"""Turns ``__torch_function__`` handling (modes and subclasses) off inside: a probe's own measuring
ops skip the ``TorchFunctionMode`` the forward runs under (tile_grid's whole-image grid, parity's
float16 convolutions), which would add a Python call to each of them (parity's fp16 trace: 1.33x
the plain forwards with, 1.09-1.22x without, ``bench/parity.py``); a no-op where torch lacks it."""


def check_module(model: Any) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module``, else raise :class:`OptionsError`."""
    if not isinstance(model, nn.Module):
        raise OptionsError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; "
            "pass e.g. mb.build_model('hrnet') or mb.load_model('hrnet')."
        )
    return model


def module_path(name: str) -> str:
    """The path shown for a submodule: its dotted name, ``"(model)"`` for the root."""
    return name or "(model)"


@contextmanager
def module_calls(model: nn.Module, around: CallAround, *, eval: bool = False) -> Iterator[nn.Module]:
    """Run every call of a submodule of ``model`` as ``around(module, call, args, kwargs)`` while
    the block runs (in eval mode with ``eval=True``); ``around`` makes the call itself,
    ``call(module, *args, **kwargs)``, and returns its output.

    One Python call per module call, and a ``try`` in ``around`` sees the calls that raise, also
    when the model catches the exception itself. Blocks may nest and run in several threads;
    the dispatcher is removed when the last one ends, and every submodule's ``training`` flag is
    restored on exit, also on an exception. Paths are left to the caller (:func:`module_paths`):
    walking the names of the small HRNet's 1,169 modules costs 1.5% of a forward.
    """
    modes = _training_flags(model)
    if eval:
        for module, training in modes.items():
            if training:
                module.training = False
    entry = (modes, around)
    _activate(entry)
    try:
        yield model
    finally:
        _deactivate(entry)
        for module, training in modes.items():  # exactly as before, without walking train() recursively
            if module.training != training:
                module.training = training


def module_paths(model: nn.Module) -> dict[nn.Module, str]:
    """The path of every submodule (a module registered twice keeps its last path)."""
    return {module: module_path(name) for name, module in model.named_modules(remove_duplicate=False)}


def _training_flags(model: nn.Module) -> dict[nn.Module, bool]:
    """``training`` of ``model`` and every submodule, each once, walked without building names."""
    flags: dict[nn.Module, bool] = {}
    stack = [model]
    while stack:
        module = stack.pop()
        if module is not None and module not in flags:
            flags[module] = module.training
            stack.extend(module._modules.values())
    return flags


_Entry = tuple[dict[nn.Module, bool], "CallAround"]
_LOCK = threading.Lock()
_ACTIVE: tuple[_Entry, ...] = ()  # replaced, never mutated, so a running call reads a consistent snapshot
_MODULE_CALL = nn.Module.__call__  # PyTorch's own, restored when the last block ends


def _activate(entry: _Entry) -> None:
    global _ACTIVE, _MODULE_CALL
    with _LOCK:
        if not _ACTIVE:
            _MODULE_CALL = nn.Module.__call__
            nn.Module.__call__ = _dispatch
        _ACTIVE = (*_ACTIVE, entry)


def _deactivate(entry: _Entry) -> None:
    global _ACTIVE
    with _LOCK:
        _ACTIVE = tuple(e for e in _ACTIVE if e is not entry)
        if not _ACTIVE and nn.Module.__call__ is _dispatch:
            nn.Module.__call__ = _MODULE_CALL


# PyTorch's global hooks (dicts it mutates in place): any of them disables the direct call.
_GLOBAL_HOOKS = tuple(getattr(_torch_module, name) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks"))
_tracing = torch._C._get_tracing_state


def _direct(module: nn.Module) -> Callable[..., Any]:
    """What ``nn.Module.__call__`` would end in for ``module``: its class's ``forward`` when
    ``_call_impl`` would take its fast path (no hooks of any kind, no compiled call, no
    per-instance ``forward``, no JIT trace running), that ``forward`` is a plain function (not a
    ScriptModule's) and nobody else has replaced ``nn.Module.__call__``; else the ``__call__``
    that was in place (PyTorch's own, hooks and all). ``forward`` is looked up on every call, so
    a class patched in a notebook takes effect at once."""
    cls = type(module)
    plain = _PLAIN.get(cls)
    if plain is None:
        plain = _PLAIN[cls] = _keeps_module_call(cls)
    if plain:
        forward = cls.forward
        if (type(forward) is FunctionType and _MODULE_CALL is _WRAPPED_CALL_IMPL and not (
                module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or module._compiled_call_impl is not None
                or "forward" in module.__dict__ or _GLOBAL_HOOKS[0] or _GLOBAL_HOOKS[1] or _GLOBAL_HOOKS[2]
                or _GLOBAL_HOOKS[3] or _tracing())):
            return forward
    return _MODULE_CALL


def _keeps_module_call(cls: type) -> bool:
    """Whether ``cls`` keeps ``nn.Module``'s ``__call__``, ``_call_impl`` and ``_wrapped_call_impl``
    and defines ``forward`` as a plain function (a ScriptModule's is a descriptor)."""
    own = ("__call__", "_call_impl", "_wrapped_call_impl")
    return isinstance(inspect.getattr_static(cls, "forward", None), FunctionType) and all(
        next(k for k in cls.__mro__ if name in k.__dict__) is nn.Module for name in own)


_PLAIN: dict[type, bool] = {}  # per class: may its forward be called directly (see _direct)
_WRAPPED_CALL_IMPL = nn.Module._wrapped_call_impl


def _dispatch(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``nn.Module.__call__`` while a block is active: the blocks' ``around`` PyTorch's call."""
    active = _ACTIVE
    if len(active) == 1:  # the usual case, kept cheap: 1,363 calls per small HRNet forward
        members, around = active[0]
        if module not in members:
            return _MODULE_CALL(module, *args, **kwargs)
        return around(module, _direct(module), args, kwargs)
    call = _direct(module)
    for members, around in reversed(active):  # the block entered first wraps outermost
        if module in members:
            call = _wrap(call, around)
    return call(module, *args, **kwargs)


def _wrap(call: Callable[..., Any], around: CallAround) -> Callable[..., Any]:
    """``call`` with one more block's ``around`` (nested blocks)."""
    return lambda module, *args, **kwargs: around(module, call, args, kwargs)
