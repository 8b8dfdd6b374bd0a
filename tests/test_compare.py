"""compare_models: one row per (image, model), metrics that match the direct calls, memory columns."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image

import mlbench as mb
from mlbench.studies.compare import compare_models, measure, summarize_comparison
from mlbench.metrics import match_objects, pixel_scores


@pytest.fixture(scope="module")
def tiny_sample(tmp_path_factory):
    image, labels = mb.make_spheroids((96, 96), 3, np.random.default_rng(3))
    path = tmp_path_factory.mktemp("cmp") / "tiny.png"
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(path)
    pixels, report = mb.read_image(path)
    return mb.Sample("tiny", pixels, labels, path, report, "synthetic")


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {"cbam_resunet": mb.build_model("cbam_resunet", "small").eval()}


def test_rows_and_metrics_match_direct_calls(tiny_sample, models):
    torch.set_num_threads(1)
    keep = {}
    table = compare_models([tiny_sample], models, input_size=64, full_size=None, keep=keep)
    assert list(table[["image", "model"]].itertuples(index=False, name=None)) == [("tiny", "cbam_resunet")]
    seg = keep[("tiny", "cbam_resunet")]
    row = table.iloc[0]
    assert row["pixel_iou"] == round(pixel_scores(tiny_sample.mask, seg.mask).iou, 4)
    direct = match_objects(tiny_sample.mask, seg.mask)
    assert (row["tp"], row["fp"], row["fn"], row["n_true"]) == (direct.tp, direct.fp, direct.fn, 3)
    assert row["polygons"] == len(seg.polygons)
    assert row["seconds"] >= row["forward_seconds"] > 0
    assert row["rss_peak_mib"] >= 0 and row["est_peak_mib"] > 0
    assert "full_1024_gib" not in table.columns
    summary = summarize_comparison(table)
    assert list(summary.index) == ["cbam_resunet"] and summary.loc["cbam_resunet", "pixel_iou"] == row["pixel_iou"]


def test_full_size_estimate_column(tiny_sample, models):
    table = compare_models([tiny_sample], models, input_size=64, full_size=256)
    assert table.loc[0, "full_256_gib"] > 0


def test_measure_sees_an_allocation():
    import mmap

    def allocate():
        # 64 MiB of fresh pages, held for 50 ms (an mmap: the heap may hold freed memory from earlier tests)
        block = mmap.mmap(-1, 64 * 1024 * 1024)
        pages = np.frombuffer(block, dtype=np.uint8)
        pages[:] = 1
        time.sleep(0.05)
        size = pages.size
        del pages
        block.close()
        return size

    result, seconds, grown = measure(allocate)
    assert result == 64 * 1024 * 1024 and seconds >= 0.05 and grown > 48 * 1024 * 1024


def test_bad_arguments_raise(tiny_sample):
    with pytest.raises(mb.OptionsError, match="models must be names or torch.nn.Module objects, got int"):
        compare_models([tiny_sample], [3])
    with pytest.raises(mb.OptionsError, match=r"samples must be names or mb.Sample objects, got \['int'\]"):
        compare_models([5], {"x": torch.nn.Identity()})
    with pytest.raises(mb.ModelError, match="nope"):
        compare_models([tiny_sample], ["nope"])


def test_compare_command_prints_the_table(monkeypatch, capsys):
    import argparse
    import json

    import pandas as pd

    import mlbench.studies.compare as compare

    seen = {}

    def fake(samples, models, preset, full_size):
        seen.update(samples=samples, models=models, preset=preset, full_size=full_size)
        return pd.DataFrame({"image": ["a"], "model": ["hrnet"], "pixel_iou": [0.5]})

    monkeypatch.setattr(compare, "compare_models", fake)
    parser = argparse.ArgumentParser()
    compare.add_compare_command(parser.add_subparsers())
    args = parser.parse_args(["compare", "--samples", "spheroids_8bit", "--models", "hrnet", "--no-full-size", "--json"])
    assert args.run(args) == 0
    assert seen == {"samples": ["spheroids_8bit"], "models": ["hrnet"], "preset": "fixed", "full_size": None}
    assert json.loads(capsys.readouterr().out) == [{"image": "a", "model": "hrnet", "pixel_iou": 0.5}]
