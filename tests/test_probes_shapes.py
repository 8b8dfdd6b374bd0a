"""trace_shapes and the explanations: known failures with known fixes."""

from __future__ import annotations

import pytest
import torch

import mlbench as mb
from mlbench.errors import OptionsError
from mlbench.pipeline.preprocess import normalize_tensor
from mlbench.probes import explain_error, size_chain, trace_shapes, valid_sides
from probe_toys import ToyNet, TupleNet

REAL_MESSAGE = "The size of tensor a (124) must match the size of tensor b (125) at non-singleton dimension 3"


def test_valid_sides_and_chain():
    assert valid_sides(1000, 16) == (992, 1008)
    assert valid_sides(1024, 16) == (1024,)
    assert size_chain(1000, 16) == [1000, 500, 250, 125, 62]


def test_ma_resunet_1000_is_explained_on_meta():
    model = mb.build_model("ma_resunet", "small", device="meta")
    trace = trace_shapes(model, torch.empty(1, 3, 1000, 1000, device="meta"))
    assert not trace.ok and trace.failed.path == "att4"
    assert trace.operands == ("(1, 64, 124, 124)", "(1, 64, 125, 125)")
    why = trace.explain()
    assert why.failure_class == "shape_mismatch" and why.valid_sizes == (992, 1008)
    assert "992 or 1008" in why.fix and "125" in why.cause and "att4" in why.summary
    fixed = trace_shapes(model, torch.empty(1, 3, 1008, 1008, device="meta"))
    assert fixed.statistics == "none" and "values not measured" in fixed.explain().summary  # shapes, no values


def test_real_message_is_explained():
    why = explain_error(RuntimeError(REAL_MESSAGE), model=mb.build_model("ma_resunet", device="meta"),
                        input_shape=(1, 3, 1000, 1000))
    assert "124 and 125" in why.summary
    assert "1000 -> 500 -> 250 -> 125 -> 62" in why.cause and "992 or 1008" in why.fix
    assert "pad_to_multiple" in why.fix


def test_hrnet_silent_resize():
    model = mb.build_model("hrnet", "small", device="meta")
    trace = trace_shapes(model, torch.empty(1, 3, 250, 250, device="meta"))
    assert trace.ok and trace.output_shape == (1, 1, 252, 252)
    why = trace.explain()
    assert why.failure_class == "shape_mismatch" and "252x252" in why.summary and why.valid_sizes == (248, 252)


@pytest.mark.parametrize("channels, word", [(1, "grayscale"), (4, "alpha")])
def test_channel_mismatch(channels, word):
    why = trace_shapes(ToyNet(), torch.zeros(1, channels, 8, 8)).explain()
    assert why.failure_class == "shape_mismatch" and word in why.fix and f"got {channels}" in why.summary


@pytest.mark.parametrize("dtype, hint", [(torch.uint8, "255"), (torch.float64, "x.float()")])
def test_dtype_mismatch(dtype, hint):
    why = trace_shapes(ToyNet(), torch.zeros(1, 3, 8, 8, dtype=dtype)).explain()
    assert why.failure_class == "dtype_mismatch" and hint in why.fix


def test_grayscale_broadcast_in_normalisation():
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape") as info:
        normalize_tensor(torch.zeros(1, 8, 8))
    why = explain_error(info.value)
    assert why.failure_class == "shape_mismatch" and "convert('RGB')" in why.fix


def test_first_nan_from_weights():
    model = ToyNet()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    trace = trace_shapes(model, torch.rand(1, 3, 8, 8))
    assert trace.first_nonfinite.path == "2"
    why = trace.explain()
    assert why.failure_class == "nan_output" and "parameters hold 1" in why.cause


def test_first_nan_from_input():
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    trace = trace_shapes(ToyNet(), x)
    assert trace.first_nonfinite.path == "0" and "input already held 1" in trace.explain().cause


def test_nested_probes_other_models_and_module_hooks():
    """A trace inside a memory timeline: both see every call of their model; another model's calls
    are not recorded, and hooks registered on a module (the service's cancel hooks) still fire."""
    model, other, fired = ToyNet(), ToyNet(), []
    handle = model[0].register_forward_pre_hook(lambda module, args: fired.append(tuple(args[0].shape)))
    try:
        with mb.record_memory(model) as timeline:
            trace = trace_shapes(model, torch.zeros(1, 3, 8, 8))
            other(torch.zeros(1, 3, 4, 4))
    finally:
        handle.remove()
    assert [c.path for c in trace.calls] == ["(model)", "0", "1", "2"] and fired == [(1, 3, 8, 8)]
    entered = [m for e, m in zip(timeline.table["event"], timeline.table["module"]) if e == "enter"]
    assert entered == ["(model)", "0", "1", "2"]  # the other model's calls are nobody's business
    assert torch.nn.Module.__call__ is torch.nn.Module._wrapped_call_impl


def test_a_trace_in_one_thread_leaves_another_threads_model_alone():
    import threading

    traced, busy, calls = ToyNet(), ToyNet(), []
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            calls.append(busy(torch.zeros(1, 3, 4, 4)).shape)

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        traces = [trace_shapes(traced, torch.zeros(1, 3, 8, 8)) for _ in range(20)]
    finally:
        stop.set()
        worker.join()
    assert all([c.path for c in t.calls] == ["(model)", "0", "1", "2"] for t in traces) and calls
    assert torch.nn.Module.__call__ is torch.nn.Module._wrapped_call_impl


def test_hooks_removed_and_mode_restored_after_failure():
    model = ToyNet().train()
    trace = trace_shapes(model, torch.zeros(1, 2, 8, 8))
    assert trace.error is not None and model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    from torch.nn.modules import module as torch_module

    assert not torch_module._global_forward_hooks and not torch_module._global_forward_pre_hooks
    assert torch.nn.Module.__call__ is torch_module.Module._wrapped_call_impl  # PyTorch's own call is back
    assert [c.status for c in trace.calls] == ["raised through", "failed"]


def test_table_and_nested_outputs():
    trace = trace_shapes(TupleNet(), torch.ones(2, 3, 4, 5), stats="every")
    table = trace.table
    assert list(table["path"]) == ["(model)", "conv"]
    assert table.loc[0, "outputs"] == "(2, 2, 4, 5), {half: (2, 1, 4, 5)}"
    assert table.loc[1, "parameters"] == 8 and table.loc[1, "nan"] == 0
    assert "ShapeTrace(TupleNet" in repr(trace) and trace.explain().failure_class == "ok"


def test_without_stats_has_no_statistics():
    trace = trace_shapes(ToyNet(), torch.ones(1, 3, 4, 4), stats=False)
    assert trace.calls[1].min is None and trace.calls[1].outputs == "(1, 4, 4, 4)"
    assert "values not measured" in trace.explain().summary and trace.statistics == "none"


def test_bad_arguments():
    with pytest.raises(OptionsError, match="must be a torch.Tensor"):
        trace_shapes(ToyNet(), [[1.0]])
    with pytest.raises(OptionsError, match="must be a torch.nn.Module"):
        trace_shapes("hrnet", torch.zeros(1))


def test_unknown_error():
    why = explain_error(KeyError("boom"))
    assert why.failure_class == "unknown" and "trace_shapes" in why.fix


class _DictSegmenter(torch.nn.Module):
    """torchvision-style output: {"out": map, "aux": map}; ``shrink`` makes the main map 2 px smaller."""

    def __init__(self, shrink: bool = False) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3, padding=0 if shrink else 1)

    def forward(self, x):
        return {"out": self.conv(x), "aux": self.conv(x)[:, :1]}


def test_dict_outputs_are_compared_by_their_first_map():
    fine = trace_shapes(_DictSegmenter(), torch.rand(1, 3, 16, 16))
    assert fine.output_shape == (1, 2, 16, 16) and fine.output_shapes == {"out": (1, 2, 16, 16), "aux": (1, 1, 16, 16)}
    assert fine.explain().summary.endswith("{out: (1, 2, 16, 16), aux: (1, 1, 16, 16)}, all block outputs finite, "
                                           "output size matches the input")
    shrunk = trace_shapes(_DictSegmenter(shrink=True), torch.rand(1, 3, 16, 16)).explain()
    assert shrunk.failure_class == "shape_mismatch" and "output 14x14 differs from input 16x16" in shrunk.summary


def test_an_output_that_is_not_a_map_is_not_called_a_size_match():
    lstm = torch.nn.LSTM(3, 5, batch_first=True)

    class Sequence(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = lstm

        def forward(self, x):
            return self.lstm(x.flatten(2).transpose(1, 2))[0]

    why = trace_shapes(Sequence(), torch.rand(1, 3, 4, 4)).explain()
    assert why.failure_class == "ok" and "-> (1, 16, 5)" in why.summary
    assert "no (N, C, H, W) output to compare with the input's size" in why.summary


class _FallbackNet(torch.nn.Module):
    """A fast path that raises and a fallback, the way attention kernels are often chosen;
    ``convert`` re-raises the failure as a ValueError from the model itself."""

    def __init__(self, convert: bool = False) -> None:
        super().__init__()
        self.convert = convert
        self.fast = torch.nn.Conv2d(2, 2, 1)  # expects 2 channels: fails on the 3-channel input
        self.slow = torch.nn.Conv2d(3, 2, 1)
        self.head = torch.nn.Conv2d(2, 1, 1)

    def forward(self, x):
        try:
            y = self.fast(x)
        except RuntimeError as exc:
            if self.convert:
                raise ValueError("no kernel for this input") from exc
            y = self.slow(x)
        return self.head(y)


def test_an_exception_the_model_catches_does_not_corrupt_the_trace():
    trace = trace_shapes(_FallbackNet(), torch.rand(1, 3, 8, 8))
    assert trace.ok and trace.failed is None and trace.explain().failure_class == "ok"
    rows = {c.path: (c.status, c.outputs) for c in trace.calls}
    assert rows == {"(model)": ("ok", "(1, 1, 8, 8)"), "fast": ("raised, caught", ""),
                    "slow": ("ok", "(1, 2, 8, 8)"), "head": ("ok", "(1, 1, 8, 8)")}


def test_the_failed_call_is_the_one_whose_error_ended_the_forward():
    trace = trace_shapes(_FallbackNet(convert=True), torch.rand(1, 3, 8, 8))
    assert not trace.ok and isinstance(trace.error, ValueError)
    assert trace.failed.path == "(model)" and trace.operands == ("(1, 3, 8, 8)",)
    assert [c.status for c in trace.calls] == ["failed", "raised, caught"]



class _Saturating(torch.nn.Module):
    """Multiplies by ``scale``: 1e39 turns every float32 value into +-Inf, which the Sigmoid after it
    maps back to 0 or 1, so the model's output is finite and only the trace can tell."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return x * self.scale


def _vanishing_inf_net():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), _Saturating(1e39), torch.nn.Sigmoid())


def test_an_inf_that_vanishes_before_the_output_is_still_found():
    x = torch.rand(1, 3, 8, 8)
    trace = trace_shapes(_vanishing_inf_net(), x)
    assert torch.isfinite(_vanishing_inf_net()(x)).all()
    assert trace.first_nonfinite.path == "1" and trace.calls[2].inf == 128 and trace.calls[2].nan == 0
    assert trace.explain().failure_class == "nan_output"


def test_every_statistics_are_exact_extremes_and_full_adds_the_mean():
    """min/max equal torch's on every output, also where one extreme value would escape a sample;
    the in-place ReLU's row shows the clamped values, the conv's row the values before it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(inplace=True),
                                    torch.nn.Conv2d(4, 1, 1), torch.nn.ReLU6(), torch.nn.Hardtanh(-0.5, 0.25))
    x = torch.rand(1, 3, 64, 64)
    x[0, 1, 37, 41] = 50.0  # one extreme pixel among 12,288
    with torch.no_grad():
        conv = model[0](x)
        outputs = [conv.clone(), conv.relu(), None, None, None]
        outputs[2] = model[2](outputs[1])
        outputs[3] = model[3](outputs[2])
        outputs[4] = model[4](outputs[3])
    default, full = trace_shapes(model, x, stats="every"), trace_shapes(model, x, stats="full")
    for call, expected in zip(default.calls[1:], outputs):
        assert (call.min, call.max) == (round(float(expected.min()), 6), round(float(expected.max()), 6)), call.path
        assert call.mean is None and call.nan == 0 and call.inf == 0
    for call, expected in zip(full.calls[1:], outputs):
        assert call.mean == pytest.approx(float(expected.double().mean()), abs=1e-6)
    assert default.calls[1].min < 0 <= default.calls[2].min  # the conv's own values, kept before the ReLU ran


def test_sums_that_overflow_their_dtype_still_give_the_mean():
    class Constant(torch.nn.Module):
        def __init__(self, value: float, dtype: torch.dtype) -> None:
            super().__init__()
            self.value, self.dtype = value, dtype

        def forward(self, x):
            return torch.full((1, 1, 256, 256), self.value, dtype=self.dtype)

    half = trace_shapes(Constant(60000.0, torch.float16), torch.zeros(1), stats="full").calls[0]
    assert (half.mean, half.max, half.nan, half.inf) == (60000.0, 60000.0, 0, 0)
    big = trace_shapes(Constant(3e38, torch.float32), torch.zeros(1), stats="full").calls[0]
    assert big.mean == pytest.approx(3e38, rel=1e-6) and big.inf == 0 and big.nan == 0


def test_stats_must_be_true_false_every_or_full():
    with pytest.raises(OptionsError, match="stats must be True, False, 'every' or 'full', got 'mean'"):
        trace_shapes(ToyNet(), torch.ones(1, 3, 4, 4), stats="mean")


class _Block(torch.nn.Module):
    """conv -> norm -> ReLU inside one block, so the default statistics measure the block's output only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = torch.nn.InstanceNorm2d(channels)
        self.relu = torch.nn.ReLU()

    def forward(self, x):
        return self.relu(self.norm(self.conv(x)))


def _blocks(poison: str | None = None) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(_Block(3), _Block(3), torch.nn.Conv2d(3, 1, 1))
    if poison:
        with torch.no_grad():
            model.get_submodule(poison).weight[0, 0, 0, 0] = float("nan")
    return model


def test_default_statistics_measure_block_outputs_exactly_and_leave_leaves_out():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = _blocks()
    default, every = trace_shapes(model, x), trace_shapes(model, x, stats="every")
    assert default.statistics == "blocks" and default.passes == 1 and every.statistics == "every module"
    measured = {c.path: (c.min, c.max, c.nan, c.inf) for c in default.calls if c.min is not None}
    assert set(measured) == {"(model)", "0", "1"}  # the blocks and the model (its output is leaf "2"'s)
    exact = {c.path: (c.min, c.max, c.nan, c.inf) for c in every.calls}
    assert all(measured[path] == exact[path] for path in measured)
    assert default.calls[2].path == "0.conv" and default.calls[2].min is None and exact["0.conv"][0] is not None
    assert [c.outputs for c in default.calls] == [c.outputs for c in every.calls]
    assert default.explain().failure_class == "ok"
    assert "values: min/max/NaN/Inf of block outputs; stats='every' for every module" in default.text()


def test_a_nan_inside_a_block_is_named_exactly_by_the_second_pass():
    """The NaN is made by a conv whose row the default does not measure; the block's output shows
    it, and the second pass names the conv, its counts and the weight that caused it."""
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    trace = trace_shapes(_blocks(poison="1.conv"), x)
    assert trace.passes == 2 and trace.statistics == "every module"
    assert "values: min/max/NaN/Inf of every module (a second pass: NaN/Inf was found)" in trace.text()
    first = trace.first_nonfinite
    assert first.path == "1.conv" and first.nan == 16 * 16  # the channel of the NaN weight, every pixel
    assert trace.nonfinite_parameters["1.conv"] == 1 and "parameters hold 1" in trace.explain().cause


def test_the_second_pass_draws_the_same_random_numbers():
    """A model that draws noise in its forward: the second pass starts from the same random state,
    so its values are the first pass's, and the caller's generator ends where one forward leaves it."""

    class Noisy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1))

        def forward(self, x):
            noise = torch.rand_like(x)
            return self.body(x + noise) / noise.min()  # Inf when a zero is drawn: not here

    model = Noisy()
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("inf")  # makes the second pass run
    torch.manual_seed(5)
    trace = trace_shapes(model, x)
    after = torch.rand(1)
    torch.manual_seed(5)
    torch.rand_like(x)
    assert trace.passes == 2 and torch.equal(after, torch.rand(1))
    torch.manual_seed(5)
    with torch.no_grad():
        expected = model.body(x + torch.rand_like(x))
    body = next(c for c in trace.calls if c.path == "body")
    assert body.inf == int(torch.isinf(expected).sum()) and body.max == round(float(expected[torch.isfinite(expected)].max()), 6)


def test_eval_false_measures_every_module_in_one_pass():
    model = _blocks(poison="1.conv").train()
    trace = trace_shapes(model, torch.rand(1, 3, 16, 16), eval=False)
    assert trace.statistics == "every module" and trace.passes == 1 and trace.first_nonfinite.path == "1.conv"


def test_a_trace_calls_what_pytorch_would_call():
    """The dispatcher calls ``forward`` directly only where PyTorch's own call would do nothing
    else: a forward replaced on the instance, a global hook, a scripted submodule and a class
    with its own ``__call__`` all behave as without the trace."""
    from torch.nn.modules import module as torch_module

    class OwnCall(torch.nn.Identity):
        def __call__(self, x):
            return super().__call__(x) + 1

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated; users still have them
        scripted = torch.jit.script(torch.nn.Conv2d(3, 3, 1))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), scripted, OwnCall(), torch.nn.Identity())
    model[3].forward = lambda x: x * 2  # patched on the instance, as some libraries do
    x = torch.rand(1, 3, 4, 4)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(expected, (model[1](model[0](x)) + 1) * 2)
    trace = trace_shapes(model, x)
    assert trace.ok and [c.path for c in trace.calls][:3] == ["(model)", "0", "1"] and "2" in [c.path for c in trace.calls]
    assert next(c for c in trace.calls if c.path == "(model)").max == round(float(expected.max()), 6)
    seen = []
    handle = torch_module.register_module_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    try:
        with torch.no_grad():
            model(x)
        trace_shapes(model, x)
    finally:
        handle.remove()
    assert seen and seen[:len(seen) // 2] == seen[len(seen) // 2:]  # the user's global hook fires as without the trace


def test_a_forward_patched_on_the_class_between_traces_is_the_one_traced():
    class Doubler(torch.nn.Module):
        def forward(self, x):
            return x * 2

    model = torch.nn.Sequential(Doubler())
    x = torch.ones(1, 1, 2, 2)
    assert trace_shapes(model, x).calls[0].max == 2.0
    Doubler.forward = lambda self, x: x * 3  # as one does in a notebook while debugging
    assert trace_shapes(model, x).calls[0].max == 3.0


def test_a_leaf_that_hides_an_inf_passed_by_keyword_is_still_watched():
    class Squash(torch.nn.Module):  # a custom leaf: maps +-Inf to +-1, so nothing after it shows one
        def forward(self, x, *, scale=1.0):
            return torch.tanh(x * scale)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.squash = Squash()

        def forward(self, x):
            return self.squash(x=x * 1e39)  # float32 overflow: Inf, made in the model's own code

    trace = trace_shapes(Net(), torch.rand(1, 1, 4, 4) + 0.5)
    assert trace.passes == 2 and trace.first_nonfinite is None  # no module made it: the model's own code did
    assert trace.hidden_nonfinite == ("squash",)
    why = trace.explain()
    assert why.failure_class == "nan_output" and why.module == "squash" and "own code" in why.cause
    assert trace_shapes(Net(), torch.rand(1, 1, 4, 4), stats="every").hidden_nonfinite == ("squash",)
