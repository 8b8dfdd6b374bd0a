"""Re-create the two shipped case files: ``python data/cases/make_cases.py`` from the repository root.

1. ``spheroids_16bit_as_served`` (image_format): the bundled 16-bit TIFF through the
   service's decode. ``convert('RGB')`` clips every pixel at 255, the model sees a white
   square and answers with a wrong mask. Trained ``cbam_resunet`` (the service's
   ``resunet_small``) from ``data/weights``.
2. ``ma_resunet_1000px_shape`` (shape_mismatch): a 1000x1000 upload reaching MA-ResUNet
   without the resize (``resize="none"``): 1000 is not a multiple of 16 and the decoder's
   skip connection fails with "The size of tensor a (124) must match the size of tensor b
   (125)". The failure does not depend on the weights: the untrained seed-0 model is used.

Existing case folders of these names are replaced. Deterministic except for the
timings and the doctor report, which record the machine that made the case.
"""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlbench as mb  # noqa: E402
from mlbench.cases.casefile import load_case, save_case  # noqa: E402

HERE = Path(__file__).resolve().parent


def _fresh(name: str) -> Path:
    target = HERE / name
    if target.exists():
        shutil.rmtree(target)
    return target


def make_16bit_case() -> Path:
    sample = mb.load_sample("spheroids_16bit")
    run = mb.Pipeline(mb.load_model("cbam_resunet"), "as_served").start(sample.path.read_bytes()).run()
    note = ("16-bit TIFF uploaded to the service: PIL convert('RGB') clips every pixel at 255, so the model sees a "
            "white square and returns a wrong mask (spurious polygons; the fixed preset finds the spheroids)")
    return save_case(run, _fresh("spheroids_16bit_as_served"), note=note, failure_class="image_format")


def make_shape_case() -> Path:
    image, _ = mb.make_spheroids((1000, 1000), 4, np.random.default_rng(1000))
    buffer = io.BytesIO()
    Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    model = mb.build_model("ma_resunet", "small", seed=0).eval()
    run = mb.Pipeline(model, "as_served", resize="none").start(buffer.getvalue()).run()
    note = ("1000x1000 upload to MA-ResUNet without the resize: 1000 is not a multiple of 16, the decoder's skip "
            "connection fails (124 vs 125); stretch to the model size or pad to a multiple of 16")
    return save_case(run, _fresh("ma_resunet_1000px_shape"), note=note)


if __name__ == "__main__":
    torch.set_num_threads(2)
    for path in (make_16bit_case(), make_shape_case()):
        print(load_case(path, replay=False))
