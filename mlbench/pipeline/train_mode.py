"""A model left in train mode: which of its modules that changes, and a forward in eval mode.

BatchNorm (batch statistics instead of running ones) and Dropout (random zeroing) compute
something else in train mode; a model saved or handed over in train mode changes its masks from
run to run with no error. The pipeline names those modules once and runs the forward in eval
mode, restoring every module's own flag afterwards, so the caller's model is left as it was.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["train_sensitive_modules", "evaluating"]


def _depends_on_mode(module: nn.Module) -> bool:
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)):
        return not (isinstance(module, nn.modules.dropout._DropoutNd) and module.p == 0)
    return isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats


def train_sensitive_modules(model: nn.Module) -> list[str]:
    """Paths of the modules in train mode whose output depends on it (BatchNorm, Dropout with p > 0,
    InstanceNorm with running statistics); empty when the model is safe to run as it is.

    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout2d(0.1))
    >>> train_sensitive_modules(net), train_sensitive_modules(net.eval())
    (['1', '2'], [])
    """
    return [name or type(module).__name__ for name, module in model.named_modules()
            if module.training and _depends_on_mode(module)]


@contextmanager
def evaluating(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Run the body with every module in eval mode, then restore each module's own flag."""
    if not enabled or not model.training and not any(m.training for m in model.modules()):
        yield model
        return
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag
