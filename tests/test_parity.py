"""parity (one model run different ways) and diff_runs (two runs, stage by stage, then module by module)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import mlbench as mb
from mlbench.cli import main
from mlbench.errors import ModelError, OptionsError, StageError
from mlbench.studies._parity_variants import Float16ConvolutionsOnCpu
from mlbench.studies.module_diff import compare_modules, record_modules, tolerance_for
from mlbench.studies.run_diff import polygon_changes

SAMPLE = mb.load_sample("spheroids_8bit").path


class Toy(nn.Sequential):
    """conv -> ReLU -> conv -> ReLU -> conv: (N, 3, H, W) -> (N, 1, H, W) logits; layer "2" is the third."""

    def __init__(self, inplace: bool = False) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            super().__init__(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(8, 8, 3, padding=1),
                             nn.ReLU(inplace=inplace), nn.Conv2d(8, 1, 1))


class Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class Square(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Pairs(nn.Module):
    """Returns a tuple of 2-D tensors: no (N, C, H, W) map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        return y.mean(dim=(2, 3)), y.amax(dim=(2, 3))


def _toy_parity(model: nn.Module, variants, **kwargs) -> mb.ParityReport:
    return mb.parity(model, SAMPLE, variants, input_size=32, **kwargs)


def test_train_mode_on_ma_resunet_departs_at_a_dropout_module():
    report = mb.parity("ma_resunet", SAMPLE, ["train_mode"], input_size=64)
    row = report.row("train_mode")
    assert row.status == "ran" and row.compared == "modules"
    assert row.first_departure == "encoder1.0.dropout" and row.departure_type == "Dropout2d"
    assert row.departure_shape == "(1, 16, 64, 64)" and row.departure_rel > 0.01 and row.output_departs
    assert "module(s) compute differently in train mode (encoder1.0.dropout" in row.note
    modules = report.modules("train_mode")
    assert not modules.loc[modules["module"] == "init_conv", "departs"].any()


def test_batch_and_threads_agree_within_float32_noise():
    report = mb.parity("cbam_resunet", SAMPLE, ["batch4", "threads1", "repeat"], input_size=64, stride=1)
    for row in report.rows:
        assert row.status == "ran" and row.compared == "modules", row
        assert row.first_departure is None and row.first_nonfinite is None and not row.output_departs, row
        assert row.max_logit_diff < 1e-4 and row.mask_iou == 1.0
        assert (row.polygons_added, row.polygons_lost) == (0, 0)
    assert report.row("repeat").max_logit_diff == 0.0
    assert "4 copies of the input" in report.row("batch4").note
    assert len(report.modules("batch4")) > 50


def test_a_perturbed_third_layer_is_the_first_module_that_departs():
    model = Toy().eval()
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed[2].weight[0, 0, 1, 1] += 0.5
    a = mb.Pipeline(model, input_size=32).start(SAMPLE)
    b = mb.Pipeline(changed, input_size=32).start(SAMPLE)
    diff = mb.diff_runs(a, b)
    assert diff.first_stage == "forward"
    assert [d.status for d in diff.stages[:2]] == ["same", "same"]
    assert diff.first_module["module"] == "2" and diff.first_module["type"] == "Conv2d"
    assert diff.first_module["shape"] == "(1, 8, 32, 32)"
    assert "first module that departs: 2 (Conv2d" in repr(diff)
    figure = diff.plot()
    assert len(figure.axes) == 6  # a, b, |a - b|, each with its colour bar
    same = mb.diff_runs(mb.Pipeline(model, input_size=32).start(SAMPLE), mb.Pipeline(model, input_size=32).start(SAMPLE))
    assert same.first_stage is None and same.first_module is None
    with pytest.raises(OptionsError, match="the runs agree at every stage"):
        same.plot()
    with pytest.raises(OptionsError, match="stage must be one of"):
        diff.plot("forwards")


def test_variants_that_cannot_run_here_say_why():
    report = _toy_parity(Toy().eval(), ["cpu", "cuda", "onnx"])
    cpu = report.row("cpu")
    assert cpu.status == "unavailable" and "the reference already runs on cpu" in cpu.reason
    if not torch.cuda.is_available():
        cuda = report.row("cuda")
        assert cuda.status == "unavailable" and cuda.reason.startswith("no CUDA device: ")
        assert "cuda | unavailable | no CUDA device" in repr(report)
    onnx = report.row("onnx")
    if onnx.status == "unavailable":
        assert "not installed here" in onnx.reason and "pip install 'mlbench[parity]'" in onnx.reason
    else:  # onnx, onnxscript and onnxruntime installed: it ran, outputs only
        assert onnx.status == "ran" and onnx.compared == "outputs only" and onnx.mask_iou == 1.0


def test_diff_runs_fixed_against_as_served_on_the_16_bit_sample_names_decode():
    path = mb.load_sample("spheroids_16bit").path
    fixed = mb.Pipeline("cbam_resunet", input_size=64).start(path)
    served = mb.Pipeline("cbam_resunet", preset="as_served", input_size=64).start(path)
    diff = mb.diff_runs(fixed, served)
    assert diff.first_stage == "decode"
    decode = diff.stage("decode")
    assert decode.status == "differs" and "dtype uint16 vs uint8" in decode.summary
    assert decode.max_abs is not None and decode.max_abs > 255
    assert ("decoder", "careful", "pil") in diff.options
    assert diff.first_module is None and "already differ before the forward (at decode)" in diff.module_note
    assert json.loads(json.dumps(diff.to_dict()))["first_stage"] == "decode"
    assert len(diff.plot().axes) == 4  # two images, the difference and its colour bar
    with pytest.raises(OptionsError, match="no stage named 'decoded'"):
        diff.stage("decoded")


def _strict_json(text: str) -> dict:
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_cli_prints_a_table_and_valid_json(capsys):
    args = ["parity", str(SAMPLE), "--model", "cbam_resunet", "--input-size", "64", "--variants", "repeat", "cuda"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "variant | status | max|dlogit| | mask IoU" in out and "repeat | ran | 0 | 1.0000 | +0/-0" in out
    assert main(args + ["--json"]) == 0
    data = _strict_json(capsys.readouterr().out)
    assert data["model"] == "cbam_resunet" and data["image"] == SAMPLE.name
    assert [row["variant"] for row in data["rows"]] == ["repeat", "cuda"]
    assert data["rows"][0]["status"] == "ran" and data["rows"][0]["mask_iou"] == 1.0
    assert data["reference"]["input_shape"] == [1, 3, 64, 64]


def test_cli_exits_1_when_a_variant_changes_the_mask(capsys):
    args = ["parity", str(SAMPLE), "--model", "ma_resunet", "--input-size", "64", "--variants", "train_mode", "--json"]
    assert main(args) == 1
    row = _strict_json(capsys.readouterr().out)["rows"][0]
    assert row["first_departure"] == "encoder1.0.dropout" and row["mask_iou"] < 1.0


def test_float16_overflow_is_the_first_nonfinite_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Scale(1e4), Square(), nn.Conv2d(4, 1, 1)).eval()
    report = _toy_parity(model, ["fp16", "bf16"])
    fp16 = report.row("fp16")
    assert fp16.status == "ran" and fp16.first_nonfinite == "2" and fp16.first_departure == "2"
    assert report.row("bf16").first_nonfinite is None  # bfloat16 has float32's range
    figure = report.plot()
    assert len(figure.axes[0].lines) >= 2


class _ConvInputDtypes(TorchFunctionMode):
    """Records the input dtype of every convolution that reaches the kernels beneath the modes inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: list[torch.dtype] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in Float16ConvolutionsOnCpu.OPS:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_cpu_float16_convolutions_match_the_native_float16_kernel():
    """The fp16 variant's convolutions on the CPU (float32 on the float16 values, rounded) give what the
    CPU's own float16 kernel gives on the same input, up to one float16 step (summation order)."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=4),
              nn.ConvTranspose2d(16, 8, 2, stride=2), nn.Conv2d(8, 1, 7, padding=3)]
    x = torch.randn(1, 3, 32, 32).half()
    with torch.no_grad():
        for layer in layers:
            layer = layer.half().eval()
            native = layer(x)
            with _ConvInputDtypes() as seen, Float16ConvolutionsOnCpu():
                widened = layer(x)
            assert seen.dtypes == [torch.float32]  # the kernel that ran is float32's, not the slow float16 one
            unrounded = layer.float()(x.float())
            assert widened.dtype == torch.float16 and widened.shape == native.shape
            step = torch.finfo(torch.float16).eps * native.float().abs().clamp_min(1)
            assert ((widened.float() - native.float()).abs() <= step).all(), layer
            # mostly identical, but for summation order: over 99.9% for the convolutions; 71% for the transposed
            # one on a CPU with AVX512-FP16, whose native float16 kernel rounds partial sums (100% on others)
            assert (widened == native).float().mean() > 0.5, layer
            assert not torch.equal(widened.float(), unrounded), layer  # rounded to float16 like the kernel's
            x = native
    assert "accumulate in float32" in _toy_parity(Toy().eval(), ["fp16"]).row("fp16").note


def test_tolerances_decide_what_departs():
    strict = _toy_parity(Toy().eval(), ["bf16"], tolerances={"bf16": (0.0, 0.0)})
    assert strict.row("bf16").first_departure == "0"  # the first conv already rounds
    loose = _toy_parity(Toy().eval(), ["bf16"], tolerances={"bfloat16": (10.0, 10.0)})
    assert loose.row("bf16").first_departure is None and "atol 10, rtol 10" in loose.row("bf16").tolerance


def test_torchscript_compares_outputs_only_and_says_so():
    row = _toy_parity(Toy().eval(), ["torchscript"]).row("torchscript")
    assert row.status == "ran" and row.compared == "outputs only" and row.max_logit_diff < 1e-5
    assert "no module trace inside a TorchScript graph" in row.note and "DeprecationWarning" in row.note


def test_the_callers_model_is_left_as_it_was():
    model = Toy().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _toy_parity(model, ["bf16", "train_mode", "channels_last", "threads1"])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())
    assert model[0].weight.is_contiguous()


def test_an_inplace_activation_does_not_corrupt_the_reference():
    model, x = Toy(inplace=True).eval(), torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for stride in (1, 8):
        record = record_modules(model, x, stride=stride)
        conv, relu = (record.tensors[record.index[(path, 0)]][0] for path in ("0", "1"))
        assert conv.min() < 0 and relu.min() == 0  # the convolution's output as it was before ReLU(inplace=True)
        comparison = compare_modules(model, x, record)
        assert comparison.first_departure(tolerance_for(torch.float32)) is None
        assert max(d for d in comparison.diffs if d is not None) == 0.0


def test_polygon_changes_match_objects_one_to_one():
    def square(x0: int, y0: int, side: int, kind: str = "external") -> dict:
        corners = [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)]
        return {"id": f"polygon_{x0}", "type": kind, "points": [{"x": float(x), "y": float(y)} for x, y in corners]}

    reference = [square(2, 2, 10), square(30, 30, 10)]
    assert polygon_changes(reference, reference, (64, 64)) == (0, 0)
    moved = [square(3, 2, 10), square(50, 2, 8)]
    assert polygon_changes(reference, moved, (64, 64)) == (1, 1)  # one kept (IoU 0.82), one lost, one added
    assert polygon_changes(reference, reference + [square(4, 4, 4, "internal")], (64, 64)) == (1, 0)


def test_bad_arguments_are_refused_with_the_fix():
    model = Toy().eval()
    with pytest.raises(OptionsError, match=r"unknown parity variant 'bfloat16' \(did you mean 'bf16'\?\)"):
        _toy_parity(model, ["bfloat16"])
    with pytest.raises(OptionsError, match="variants is empty"):
        _toy_parity(model, [])
    with pytest.raises(OptionsError, match="tolerances has key 'fp8'"):
        _toy_parity(model, ["bf16"], tolerances={"fp8": (0, 0)})
    with pytest.raises(OptionsError, match=r"tolerances\['bf16'\] = 0.1 is not \(atol, rtol\)"):
        _toy_parity(model, ["bf16"], tolerances={"bf16": 0.1})
    with pytest.raises(OptionsError, match="parity sets train_mode itself"):
        _toy_parity(model, ["repeat"], train_mode="keep")
    with pytest.raises(OptionsError, match="diff_runs: b must be a mlbench Run"):
        mb.diff_runs(mb.Pipeline(model, input_size=32).start(SAMPLE), "run.json")
    with pytest.raises(OptionsError, match="stride must be an int >= 1"):
        _toy_parity(model, ["repeat"], stride=0)
    with pytest.raises(ModelError, match="returned tuple without an \\(N, C, H, W\\) tensor"):
        _toy_parity(Pairs().eval(), ["repeat"])


def test_a_reference_that_fails_names_its_module():
    with pytest.raises(StageError, match=r"the reference forward failed in module att4: RuntimeError: The size of "
                       r"tensor a \(8\) must match the size of tensor b \(9\)"):
        mb.parity("ma_resunet", SAMPLE, ["repeat"], input_size=72, resize="stretch")


def test_report_lookups_refuse_unknown_names():
    report = _toy_parity(Toy().eval(), ["repeat", "torchscript"])
    with pytest.raises(OptionsError, match=r"no variant 'bf16' in this report; it has \['repeat', 'torchscript'\]"):
        report.row("bf16")
    with pytest.raises(OptionsError, match="variant 'torchscript' has no module trace"):
        report.modules("torchscript")
    table = report.table
    assert list(table.index) == ["repeat", "torchscript"] and np.isclose(table.loc["repeat", "mask_iou"], 1.0)


class OneImage(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != 1:
            raise ValueError(f"one image at a time, got a batch of {x.shape[0]}")
        return x


class Named(Toy):
    """Toy whose forward returns torchvision's ``{"out": logits}``."""

    def forward(self, x: torch.Tensor) -> dict:
        return {"out": super().forward(x)}


def test_a_variant_that_fails_says_where_and_the_others_still_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), OneImage(), nn.Conv2d(4, 1, 1)).eval()
    report = _toy_parity(model, ["batch2", "repeat"])
    batch = report.row("batch2")
    assert batch.status == "failed" and batch.reason == "ValueError in module 1: one image at a time, got a batch of 2"
    assert "batch2 | failed | ValueError in module 1" in repr(report) and report.row("repeat").status == "ran"


def test_a_variant_that_cannot_be_prepared_is_a_failed_row():
    report = _toy_parity(Named().eval(), ["torchscript", "repeat"])
    row = report.row("torchscript")
    assert row.status == "failed" and row.reason.startswith(
        "preparing the variant failed: RuntimeError: Encountering a dict at the output of the tracer")
    assert report.row("repeat").status == "ran" and report.row("repeat").max_logit_diff == 0.0
