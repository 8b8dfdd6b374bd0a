"""record_memory: known peaks, stage marks, and nothing left behind."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import mlbench as mb
from mlbench.errors import OptionsError
from mlbench.probes import note, record_memory
from probe_toys import ToyNet

PARAMS = (4 * 3 * 9 + 4 + 4 + 1) * 4  # ToyNet parameters in bytes


def test_known_peak_and_module():
    model, x = ToyNet(), torch.ones(1, 3, 16, 16)
    with torch.no_grad(), record_memory(model) as timeline:
        model(x)
    assert timeline.baseline_bytes == PARAMS
    assert timeline.peak.bytes == PARAMS + 32 * 16 * 16  # conv output + ReLU output
    assert timeline.peak.module == "1"
    table = timeline.table
    assert {"seconds", "event", "module", "live_bytes", "live_peak_bytes", "rss_bytes"} <= set(table.columns)
    assert list(table["event"][:3]) == ["start", "enter", "enter"]
    assert table["live_peak_bytes"].max() == timeline.peak.bytes


def test_nothing_left_behind_even_on_error():
    model, threads = ToyNet().train(), threading.active_count()
    with pytest.raises(RuntimeError, match="3 channels"), record_memory(model):
        model(torch.ones(1, 2, 8, 8))
    assert threading.active_count() == threads and model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    from torch.nn.modules import module as torch_module

    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    assert torch.nn.Module.__call__ is torch_module.Module._wrapped_call_impl  # PyTorch's own call is back
    from mlbench.probes.memory import _ACTIVE

    assert _ACTIVE.get() is None


def test_stages_marks_and_pipeline_run():
    model = mb.build_model("cbam_resunet", "small").eval()
    image, _ = mb.make_spheroids((80, 80), 2, np.random.default_rng(0))
    with record_memory(model) as timeline:
        run = timeline.run(mb.Pipeline(model, input_size=64).start(image))
        note("after the run")
    assert run.done
    assert [name for name, _, _ in timeline.stages] == list(run.stage_names)
    assert timeline.peak.stage == "forward" and timeline.peak.module
    assert timeline.to_dict()["marks"] == ["after the run"]
    assert "peak of live tensors" in repr(timeline) and "mark: after the run" in repr(timeline)


def test_plot_returns_figure():
    model = ToyNet()
    with record_memory(model) as timeline, timeline.stage("forward"):
        model(torch.ones(1, 3, 8, 8))
    figure = timeline.plot()
    assert figure.axes[0].get_ylabel() == "MiB"
    from matplotlib.figure import Figure

    assert isinstance(figure, Figure)
    mine = Figure()
    ax = mine.subplots()
    assert timeline.plot(ax=ax) is mine and ax.get_ylabel() == "MiB" and ax.lines


def test_note_outside_recording_is_ignored_and_bad_model():
    note("nobody listens")
    with pytest.raises(OptionsError, match="must be a torch.nn.Module"):
        record_memory("hrnet")
    assert "empty" in repr(record_memory())


def test_limit_memory_simulates_out_of_memory():
    from mlbench.probes import limit_memory

    model, x = ToyNet(), torch.ones(1, 3, 16, 16)
    with torch.no_grad(), limit_memory(32 * 16 * 16, model):
        model(x)  # exactly the peak: fits
    with pytest.raises(torch.OutOfMemoryError, match="simulated out of memory"), torch.no_grad(), \
            limit_memory(32 * 16 * 16 - 1, model):
        model(x)
    with pytest.raises(OptionsError, match="positive int"):
        limit_memory(0)


def test_a_caught_exception_does_not_leave_its_module_running():
    """A fast path that raises and is caught: what the fallback allocates belongs to the fallback."""
    from mlbench.probes.accounting import ModuleStack

    class Fallback(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fast, self.slow = torch.nn.Conv2d(2, 2, 1), torch.nn.Conv2d(3, 64, 3, padding=1)

        def forward(self, x):
            try:
                return self.fast(x)
            except RuntimeError:
                return self.slow(x).sum(1, keepdim=True)  # the peak: 64 channels, in the fallback

    model, stack, seen = Fallback(), ModuleStack(), []
    with torch.no_grad(), stack.track(model, exit=lambda path, output: seen.append((path, stack.top()))):
        model(torch.ones(1, 3, 32, 32))
    assert seen == [("slow", "slow"), ("(model)", "(model)")] and stack.top() == "(outside modules)"
    with torch.no_grad(), record_memory(model) as timeline:
        model(torch.ones(1, 3, 32, 32))
    assert timeline.peak.module == "(model)"  # the 64-channel sum, computed after "fast" raised
    events = list(zip(timeline.table["event"], timeline.table["module"]))
    assert ("enter", "fast") in events and ("exit", "fast") not in events and ("exit", "slow") in events
