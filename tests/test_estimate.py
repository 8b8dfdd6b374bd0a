"""estimate_memory and max_input_size: known answers, and agreement with a real run."""

from __future__ import annotations

import math

import pytest
import torch

import mlbench as mb
from mlbench.errors import ModelError, OptionsError
from mlbench.probes import estimate_memory, max_input_size, record_memory
from mlbench.probes.estimate import input_shape_of
from probe_toys import StridedNet, ToyNet

PARAMS = (4 * 3 * 9 + 4 + 4 + 1) * 4


def test_known_answer():
    estimate = estimate_memory(ToyNet(), 16, device="cpu")
    assert estimate.parameter_bytes == PARAMS and estimate.input_bytes == 3 * 16 * 16 * 4
    assert estimate.activation_peak_bytes == 32 * 16 * 16
    assert estimate.peak_bytes == PARAMS + 44 * 16 * 16 and estimate.peak_where == "1"
    assert estimate.output_shape == (1, 1, 16, 16) and estimate.to_dict()["dtype"] == "float32"


def test_cuda_rounds_to_blocks_and_half_halves():
    cpu = estimate_memory(ToyNet(), 3, device="cpu")
    cuda = estimate_memory(ToyNet(), 3, device="cuda")
    assert cuda.activation_peak_bytes == 2 * 512 and cpu.activation_peak_bytes == 2 * 4 * 9 * 4
    half = estimate_memory(ToyNet(), 16, dtype=torch.float16, device="cpu")
    assert half.activation_peak_bytes * 2 == 32 * 16 * 16


def test_matches_a_real_cpu_run():
    model = mb.build_model("cbam_resunet", "small").eval()
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad(), record_memory(model) as timeline:
        model(x)
    predicted = estimate_memory(model, (1, 3, 96, 96), device="cpu").peak_bytes
    measured = timeline.peak.bytes + x.numel() * 4
    assert abs(predicted / measured - 1) < 0.05


def test_full_size_ma_resunet_attention_is_the_hog():
    model = mb.build_model("ma_resunet", "full", device="meta")
    estimate = estimate_memory(model, 1024)
    assert estimate.largest_tensor_shape == (8, 4096, 4096) and estimate.largest_tensor_where == "bottleneck.1"
    assert estimate.largest_tensor_bytes == 8 * 4096 * 4096 * 4 and estimate.peak_bytes > 1.3 * 1024**3
    assert "MemoryEstimate(ma_resunet" in repr(estimate)


def test_failing_size_is_explained():
    with pytest.raises(ModelError, match="992 or 1008"):
        estimate_memory(mb.build_model("ma_resunet", "small", device="meta"), 1000)


@pytest.mark.parametrize("shape, expected", [(64, (1, 3, 64, 64)), ((32, 48), (1, 3, 32, 48)),
                                             ((1, 20, 30), (1, 1, 20, 30)), ((2, 3, 8, 8), (2, 3, 8, 8))])
def test_input_shapes(shape, expected):
    assert input_shape_of(shape) == expected


def test_bad_input_shape():
    with pytest.raises(OptionsError, match="input_shape must be"):
        estimate_memory(ToyNet(), (0, 5))


def test_max_input_size_known_answer():
    budget = PARAMS + 44 * 300 * 300 + 100
    assert max_input_size(ToyNet(), budget, device="cpu") == 300
    side = max_input_size(StridedNet(), budget, device="cpu")
    assert side == 296 and side % 8 == 0


def test_max_input_size_bad_budgets():
    with pytest.raises(OptionsError, match="positive number of bytes"):
        max_input_size(ToyNet(), -1)
    with pytest.raises(OptionsError, match="below what the smallest input"):
        max_input_size(ToyNet(), 10)


def test_memory_command_prints_json(capsys):
    import argparse
    import json

    from mlbench.probes.cli import add_memory_command

    parser = argparse.ArgumentParser()
    add_memory_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", "ma_resunet", "--sides", "1024", "--budgets-gib", "24", "--json"])
    assert args.run(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["estimates"][0]["largest_tensor_shape"] == [8, 4096, 4096]
    assert 2048 < report["largest_side"]["24 GiB"] < 2304
