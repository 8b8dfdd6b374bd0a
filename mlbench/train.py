"""Train the three small models on generated spheroids: ``python -m mlbench.train``.

Reproduces ``data/weights/``: each model is trained on CPU on small generated crops from
:func:`mlbench.make_spheroids` (seeded), with the preprocessing of the ``fixed``
preset (scale by bit depth, three channels, ImageNet mean/std), then evaluated through the ``fixed``
pipeline on 50 held-out generated 512x512 images it never saw and on the bundled samples. Writes
``<model>.safetensors`` and ``manifest.json`` (sha256, widths, recipe, normalisation
statistics, held-out IoU, and the ``domain`` statistics :func:`mlbench.check_domain` compares an
image with). ``python -m mlbench.train --domain-only`` recomputes only the ``domain`` entries of
the existing weights (read, sha256-checked, never written).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mlbench.models import build_model, list_models
from mlbench.models.cards import IMAGENET_MEAN, IMAGENET_STD
from mlbench.pipeline.options import PRESET_NAMES
from mlbench.paths import data_dir, sha256_file
from mlbench.samples.synthetic import make_spheroids

__all__ = ["Recipe", "train_model", "evaluate_iou", "domain_images", "domain_entry", "write_domain",
           "write_manifest", "main"]


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained model (recorded in the manifest)."""

    steps: int = 300
    batch: int = 8
    crop: int = 128
    lr: float = 2e-3
    pool: int = 384
    seed: int = 0
    input_size: int = 256
    radius_px: tuple[float, float] = (5.0, 34.0)


# MA-ResUNet's attention stages learn more slowly, and HRNet (with the service's align_corners=True
# upsampling) stops at 0.94 held-out IoU after 300 steps: both get more steps.
RECIPES = {"cbam_resunet": Recipe(), "hrnet": Recipe(steps=500), "ma_resunet": Recipe(steps=700)}


def _normalize(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) float in [0, 1] -> (N, 3, H, W) ImageNet-normalised tensor."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return torch.from_numpy(((images - mean) / std).transpose(0, 3, 1, 2).copy())


def _make_pool(recipe: Recipe, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    images, masks = [], []
    for _ in range(recipe.pool):
        image, labels = make_spheroids((recipe.crop, recipe.crop), int(rng.integers(1, 7)), rng,
                                       radius_range=recipe.radius_px)
        images.append(image)
        masks.append(labels > 0)
    return np.stack(images), np.stack(masks)


def _augment(images: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, 90-degree turns, then :func:`_photometric`."""
    out_i, out_m = [], []
    for image, mask in zip(images, masks):
        k, flip = int(rng.integers(4)), bool(rng.integers(2))
        image, mask = np.rot90(image, k), np.rot90(mask, k)
        if flip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        out_i.append(_photometric(image, rng))
        out_m.append(mask.copy())
    return _normalize(np.stack(out_i)), torch.from_numpy(np.stack(out_m)[:, None].astype(np.float32))


def _photometric(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) grey in [0, 1] -> (H, W, 3) float32: gain/offset/gamma, a per-channel tint, 8-bit rounding half the time."""
    image = np.clip(image * rng.uniform(0.8, 1.15) + rng.uniform(-0.08, 0.08), 0, 1) ** rng.uniform(0.8, 1.25)
    rgb = np.clip(image[..., None] * rng.uniform(0.9, 1.05, size=3), 0, 1)
    if rng.uniform() < 0.5:
        rgb = np.round(rgb * 255) / 255
    return rgb.astype(np.float32)


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    dice = 1 - (2 * (prob * target).sum() + 1) / (prob.sum() + target.sum() + 1)
    return bce + dice


def train_model(name: str, recipe: Recipe, log=print) -> torch.nn.Module:
    """Train the small ``name`` model from ``recipe``; deterministic for a given seed and thread count.

    The models' dropout draws from torch's global generator: it is seeded from ``recipe.seed``
    inside a forked RNG state, so the caller's random state is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return _train(name, recipe, log)


def _train(name: str, recipe: Recipe, log) -> torch.nn.Module:
    rng = np.random.default_rng(recipe.seed)
    model = build_model(name, size="small", seed=recipe.seed)
    images, masks = _make_pool(recipe, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.15)
    model.train()
    started = time.perf_counter()
    for step in range(recipe.steps):
        pick = rng.integers(0, len(images), size=recipe.batch)
        x, y = _augment(images[pick], masks[pick], rng)
        loss = _loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"  {name} step {step:4d} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    return model.eval()


def evaluate_iou(model: torch.nn.Module, input_size: int, n: int = 50, size: int = 512, seed: int = 12345) -> float:
    """Pixel IoU (all images pooled) of the ``fixed`` pipeline on ``n`` generated images never seen in training."""
    from mlbench.pipeline.run import Pipeline

    rng = np.random.default_rng(seed)
    pipeline = Pipeline(model, input_size=input_size)
    inter = union = 0
    for _ in range(n):
        image, labels = make_spheroids((size, size), int(rng.integers(2, 9)), rng)
        pred = pipeline.start(image).result().mask
        truth = labels > 0
        inter += int((pred & truth).sum())
        union += int((pred | truth).sum())
    return inter / union if union else 1.0


def _sample_ious(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """Pixel IoU of the freshly written weights on every bundled sample, both presets."""
    from mlbench.samples.bundled import list_samples, load_sample
    from mlbench.pipeline import segment

    out: dict[str, dict[str, float]] = {}
    for sample_name in list_samples():
        sample = load_sample(sample_name)
        truth = sample.mask > 0
        out[sample_name] = {}
        for preset in PRESET_NAMES:
            mask = segment(sample.path, model, preset=preset).mask
            union = (mask | truth).sum()
            out[sample_name][preset] = round(float((mask & truth).sum() / union) if union else 1.0, 4)
    return out


DOMAIN_IMAGES = 32
"""Generated images behind each model's ``domain`` entry (the training distribution of check_domain)."""


def domain_images(recipe: Recipe, n: int = DOMAIN_IMAGES) -> list[np.ndarray]:
    """``n`` images of the training distribution at the model's input size, deterministic.

    The generator, radius range and augmentation of training (:func:`mlbench.make_spheroids`,
    ``recipe.radius_px``, :func:`_photometric`), drawn at ``recipe.input_size`` squared (what the
    pipeline feeds the model) with the training density of spheroids (1 to 6 per ``recipe.crop``
    square), from seed ``(recipe.seed, 1)``: fresh draws, not the training crops themselves.
    """
    rng = np.random.default_rng([recipe.seed, 1])
    per_crop = round((recipe.input_size / recipe.crop) ** 2)
    size = (recipe.input_size, recipe.input_size)
    grey = [make_spheroids(size, per_crop * int(rng.integers(1, 7)), rng, radius_range=recipe.radius_px)[0]
            for _ in range(n)]
    return [_photometric(image, rng) for image in grey]


def domain_entry(model: torch.nn.Module, recipe: Recipe) -> dict:
    """The manifest's ``domain`` entry of a trained model: :func:`mlbench.checks.domain_stats.domain_reference`
    over :func:`domain_images`, through the ``fixed`` pipeline. One torch thread, so the sums run in
    the same order on every machine of the same kind."""
    from mlbench.checks.domain_stats import domain_reference

    source = (f"{DOMAIN_IMAGES} generated images of the training distribution at the {recipe.input_size} px input "
              f"(mlbench.make_spheroids, radius {recipe.radius_px[0]:g}-{recipe.radius_px[1]:g} px, training "
              f"augmentation, seed [{recipe.seed}, 1])")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return domain_reference(model, domain_images(recipe), source=source)
    finally:
        torch.set_num_threads(threads)


def write_manifest(path: Path, manifest: dict) -> None:
    """The manifest as indented JSON; in ``domain`` entries each list of numbers and each summary
    (mean, sd, min, max) on one line."""
    vectors: list[list | dict] = []

    def hold(value):
        numbers = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if numbers and all(isinstance(v, (int, float)) for v in numbers):
            vectors.append(value)
            return f"@vector{len(vectors) - 1}@"
        if isinstance(value, dict):
            return {k: hold(v) for k, v in value.items()}
        return [hold(v) for v in value] if isinstance(value, list) else value

    held = {**manifest, "models": {name: {**entry, **({"domain": hold(entry["domain"])} if "domain" in entry else {})}
                                   for name, entry in manifest["models"].items()}}
    text = json.dumps(held, indent=1)
    for k, vector in enumerate(vectors):
        text = text.replace(f'"@vector{k}@"', json.dumps(vector), 1)
    path.write_text(text + "\n")


def _save(model: torch.nn.Module, path: Path) -> None:
    """Weights as float16 safetensors: half the size; ``load_model`` casts back to float32."""
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the small models on generated spheroids (CPU).")
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--steps", type=int, default=None, help="override every model's step count")
    parser.add_argument("--out", type=Path, default=data_dir() / "weights")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (one process per core trains best)")
    parser.add_argument("--domain-only", action="store_true",
                        help="only (re)compute the manifest's domain entries of the weights in --out; no training, "
                             "the weights files are left as they are")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.models:
        recipe = RECIPES[name] if args.steps is None else Recipe(**{**asdict(RECIPES[name]), "steps": args.steps})
        if args.domain_only:
            write_domain(name, recipe, args.out)
        else:
            _train_and_record(name, recipe, args.out)


def write_domain(name: str, recipe: Recipe, out: Path) -> dict:
    """Compute the ``domain`` entry of the weights in ``out`` (sha256-checked) and store it in its
    manifest; the weights file is only read."""
    from mlbench.models.loading import load_trained

    started = time.perf_counter()
    entry = domain_entry(load_trained(name, out), recipe)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())  # re-read: other models may run in parallel processes
    manifest["models"][name]["domain"] = entry
    write_manifest(manifest_path, manifest)
    print(f"{name}: domain statistics of {entry['images']} images, {time.perf_counter() - started:.0f} s")
    return entry


def _train_and_record(name: str, recipe: Recipe, out: Path) -> None:
    from mlbench.models.loading import load_trained

    started = time.perf_counter()
    model = train_model(name, recipe)
    path = out / f"{name}.safetensors"
    _save(model, path)
    manifest_path = out / "manifest.json"
    # re-read the manifest: other models may be training in parallel processes
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"format": 1, "models": {}}
    manifest["models"][name] = {
        "file": path.name, "sha256": sha256_file(path), "size": "small", "dtype": "float16",
        "config": asdict(model.config), "parameters": sum(p.numel() for p in model.parameters()),
        "input_size": recipe.input_size, "preset": "fixed",
        "normalization": {"scaling": "by effective bit depth", "mean": IMAGENET_MEAN, "std": IMAGENET_STD},
        "training": {**asdict(recipe), "data": f"mlbench.make_spheroids {recipe.crop}x{recipe.crop}, 1-6 spheroids",
                     "seconds": round(time.perf_counter() - started)},
    }
    write_manifest(manifest_path, manifest)
    saved = load_trained(name, out)  # evaluate exactly what ships
    iou = evaluate_iou(saved, recipe.input_size)
    samples = _sample_ious(saved)
    manifest = json.loads(manifest_path.read_text())
    manifest["models"][name].update({"heldout_pixel_iou": round(iou, 4), "samples_pixel_iou": samples,
                                     "heldout": "50 generated 512x512 images, seed 12345, fixed preset"})
    write_manifest(manifest_path, manifest)
    write_domain(name, recipe, out)
    print(f"{name}: held-out pixel IoU {iou:.4f}, {time.perf_counter() - started:.0f} s -> {path}")


if __name__ == "__main__":
    main()
