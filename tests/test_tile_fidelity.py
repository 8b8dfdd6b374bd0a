"""tile_fidelity: the smallest tile whose mask matches the whole image, measured."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import mlbench as mb
from mlbench.errors import OptionsError
from mlbench.studies._tile_fidelity import TileFidelity, logits_to_mask, mask_iou
from mlbench.probes.tiling import run_tiled
from probe_toys import LocalNet, NormNet


def _bright_top(size: tuple[int, int] = (96, 96)) -> torch.Tensor:
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0)) - 0.5
    x[..., : size[0] // 2, :] += 1.5  # each tile's own statistics differ from the image's
    return x


def test_a_local_model_is_faithful_at_every_tile():
    fidelity = mb.tile_fidelity(LocalNet(), _bright_top(), tiles=[32, 48], overlap=12)
    assert list(fidelity.table[["tile", "norm_stats"]].itertuples(index=False, name=None)) == [
        (32, "tile"), (32, "image"), (48, "tile"), (48, "image")]
    assert (fidelity.table["iou"] == 1.0).all() and fidelity.table["settled"].all()
    assert fidelity.smallest("tile") == fidelity.smallest("image") == 32


def test_norms_make_small_tiles_unfaithful_until_pooled():
    model, x = NormNet(), _bright_top()
    fidelity = mb.tile_fidelity(model, x, tiles=[32, 48], overlap=12, target=0.999,
                                norm_stats=("tile", "image", "pooled"))
    table = fidelity.table.set_index(["tile", "norm_stats"])
    assert table.loc[(32, "tile"), "iou"] < 0.999 and fidelity.smallest("tile") is None
    # 25 tiles of 32 px in batches of 4: one pass from a downsampled prior gets closer, the passes get there;
    # 9 tiles of 48 px: a batch's pixels (96 px a side) hold the whole image, whose statistics make one pass exact
    assert (table.xs("image", level="norm_stats")["iou"] > table.xs("tile", level="norm_stats")["iou"]).all()
    assert (table.xs("image", level="norm_stats")["passes"] == 1).all() and table.loc[(48, "image"), "iou"] == 1.0
    assert (table.xs("pooled", level="norm_stats")["iou"] >= 0.999).all() and fidelity.smallest("pooled") == 32
    assert table.loc[(32, "pooled"), "passes"] > 1 and table.loc[(48, "pooled"), "passes"] == 1
    text = repr(fidelity)
    assert "the whole 96x96 image (target >= 0.999)" in text
    assert "norm_stats='tile': 32: " in text and "no measured tile is faithful" in text
    assert "norm_stats='pooled': 32: 1.0000, 48: 1.0000 -> smallest faithful tile 32" in text
    exact = mb.tile_fidelity(model, x, tiles=[32], overlap=12, target=0.999, norm_stats="image", tile_batch=25)
    assert exact.table.loc[0, ["iou", "passes"]].tolist() == [1.0, 1]  # every tile in one batch: exact at once


def test_smallest_needs_every_larger_tile_to_pass_too():
    rows = [{"tile": t, "norm_stats": "image", "iou": iou, "passes": 3, "settled": True, "time_ratio": 2.0}
            for t, iou in [(256, 0.995), (320, 0.98), (384, 0.996), (448, 0.999)]]
    fidelity = TileFidelity(pd.DataFrame(rows), 0.99, (512, 512))
    assert fidelity.smallest("image") == 384  # 256 passed by luck between failing 320 and passing 384
    failing = TileFidelity(pd.DataFrame(rows).assign(iou=0.5), 0.99, (512, 512))
    assert failing.smallest("image") is None
    with pytest.raises(OptionsError, match="norm_stats='tile' was not measured; measured: \\['image'\\]"):
        fidelity.smallest("tile")


def test_unsettled_passes_are_reported_not_warned(recwarn):
    fidelity = mb.tile_fidelity(NormNet(), _bright_top(), tiles=[32], overlap=12, norm_stats="pooled", max_passes=2,
                                tolerance=1e-6)
    assert fidelity.table.loc[0, ["passes", "settled"]].tolist() == [2, False]
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_tolerance_trades_passes_for_closeness():
    model, x = NormNet(), _bright_top()
    with torch.no_grad():
        whole = model(x)
    loose = run_tiled(model, x, 32, 12, norm_stats="pooled", tolerance=0.8)  # 2 passes; 4 to settle below 1e-5
    tight = run_tiled(model, x, 32, 12, norm_stats="pooled", tolerance=1e-5)
    assert loose.passes < tight.passes and loose.settled and tight.settled
    assert (tight.output - whole).norm() < (loose.output - whole).norm()


def test_masks_and_multiclass_iou():
    logits = torch.tensor([[[[1.0, -1.0], [0.5, -0.2]]]])
    assert logits_to_mask(logits).tolist() == [[[True, False], [True, False]]]
    three = torch.zeros(1, 3, 2, 2)
    three[0, 2, 0, 0] = three[0, 1, 1, 1] = 1.0
    labels = logits_to_mask(three)
    assert labels.tolist() == [[[2, 0], [0, 1]]]
    swapped = labels.clone()
    swapped[0, 0, 0] = 1  # class 2 became class 1: the binary foreground is unchanged, the classes are not
    assert mask_iou(labels, labels) == 1.0 and mask_iou(labels, swapped) == pytest.approx((1 + 0.5 + 0) / 3)


def test_bad_arguments_name_the_fix():
    with pytest.raises(OptionsError, match="norm_stats must be one or more of 'image', 'pooled', 'tile', got 'whole'"):
        mb.tile_fidelity(LocalNet(), _bright_top(), tiles=[32], overlap=12, norm_stats="whole")
    with pytest.raises(OptionsError, match="target is a mask IoU in \\(0, 1\\], got 99"):
        mb.tile_fidelity(LocalNet(), _bright_top(), tiles=[32], overlap=12, target=99)
    with pytest.raises(OptionsError, match="add the batch axis"):
        mb.tile_fidelity(LocalNet(), _bright_top()[0])
    with pytest.raises(OptionsError, match="too small to tile with overlap 64"):
        mb.tile_fidelity(LocalNet(), _bright_top((100, 100)))


def test_tiles_command(capsys):
    import json

    from mlbench.cli import main
    from mlbench.samples.bundled import load_sample

    image = str(load_sample("spheroids_8bit").path)
    assert main(["tiles", image, "--model", "cbam_resunet", "--tiles", "384", "--mode", "image", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["smallest"] == {"image": 384} and report["image_size"] == [512, 512]
    assert report["rows"][0]["tile"] == 384 and report["rows"][0]["iou"] >= 0.999  # 0.9999
    # each tile normalised by its own statistics: no faithful tile, exit status 1, said in words
    assert main(["tiles", image, "--model", "cbam_resunet", "--tiles", "384", "--mode", "tile"]) == 1
    assert "no measured tile is faithful" in capsys.readouterr().out
