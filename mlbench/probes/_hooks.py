"""PyTorch's hook-handle idiom in one place: hooks on every submodule, always removed.

:func:`module_hooks` registers a forward pre-hook and a forward hook on every named
submodule, yields, then removes every handle and restores ``model.training`` in a
``finally``, even when the forward raises. The probes (shapes, memory) build on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from mlbench.errors import OptionsError

PreHook = Callable[[str, nn.Module, tuple[Any, ...]], None]
PostHook = Callable[[str, nn.Module, tuple[Any, ...], Any], None]


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
def module_hooks(
    model: nn.Module, pre: PreHook | None = None, post: PostHook | None = None, *, eval: bool = False
) -> Iterator[nn.Module]:
    """Call ``pre(path, module, args)`` and ``post(path, module, args, output)`` around every
    submodule's forward while the block runs (in eval mode with ``eval=True``).

    Two global hooks (``torch.nn.modules.module.register_module_forward_*hook``) filtered to
    ``model``'s submodules cost less than one handle per module. The handles are removed and
    every submodule's ``training`` flag restored on exit, also on an exception. One walk over
    the modules serves paths, modes and eval (a small HRNet has 1,255 module calls).
    """
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    paths, modes = {}, {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths[module], modes[module] = module_path(name), module.training
        if eval:
            module.training = False
    handles = []
    try:
        if pre is not None:
            handles.append(register_module_forward_pre_hook(_bind_pre(pre, paths)))
        if post is not None:
            handles.append(register_module_forward_hook(_bind_post(post, paths)))
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():  # exactly as before, without walking train() recursively
            if module.training != training:
                module.training = training


def _bind_pre(pre: PreHook, paths: dict[nn.Module, str]) -> Callable[[nn.Module, tuple[Any, ...]], None]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        path = paths.get(module)
        if path is not None:
            pre(path, module, args)

    return hook


def _bind_post(post: PostHook, paths: dict[nn.Module, str]) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        path = paths.get(module)
        if path is not None:
            post(path, module, args, output)

    return hook
