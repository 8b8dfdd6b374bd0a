"""``check_normalization``: does a model input look like what the weights were trained on?

The weights were trained on ``(x / max - mean) / std`` with the mean/std recorded in
``data/weights/manifest.json``. A wrong normalisation raises no error: the mask just degrades.
:func:`check_normalization` compares a model input (after preprocessing) with the training
distribution (generated spheroids through the same fixed preprocessing) and names the mistake
whose undoing brings the input closest to it: ``/255`` without mean/std, mean/std applied
twice, a 0..255 range, a channel-order swap; and flags constant, saturated or NaN inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch

from mlbench.errors import OptionsError
from mlbench.findings import Problem, ReportText

__all__ = ["Reference", "NormReport", "training_reference", "check_normalization"]

_SAMPLE = 4096


@dataclass(frozen=True, eq=False)
class Reference:
    """The training distribution of the model input: normalisation used and per-channel statistics.

    ``mean``/``std`` are the normalisation constants; ``input_mean``/``input_std`` the
    per-channel statistics of the normalised training inputs, ``spread`` the standard
    deviation of per-image means; ``values`` a (3, K) sample for plotting.
    """

    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    spread: tuple[float, ...]
    values: np.ndarray = field(repr=False)


def _manifest_normalization(model: str | None) -> tuple[str, tuple, tuple]:
    from mlbench.models.cards import IMAGENET_MEAN, IMAGENET_STD
    from mlbench.paths import data_dir

    path = data_dir() / "weights" / "manifest.json"
    if model is not None and path.exists():
        import json

        from mlbench.models import resolve_name

        entry = json.loads(path.read_text()).get("models", {}).get(resolve_name(model))
        if entry and "normalization" in entry:
            norm = entry["normalization"]
            return f"manifest entry of {resolve_name(model)}", tuple(norm["mean"]), tuple(norm["std"])
    return "ImageNet defaults (no manifest entry used)", IMAGENET_MEAN, IMAGENET_STD


@lru_cache(maxsize=8)
def training_reference(model: str | None = None, n: int = 8, size: int = 128, seed: int = 0) -> Reference:
    """Statistics of ``n`` generated training-like inputs after the fixed preprocessing.

    Parameters
    ----------
    model : str, optional
        Take mean/std from this model's manifest entry; ImageNet's when None or absent.
    n, size, seed : int
        How many ``size`` x ``size`` images :func:`mlbench.make_spheroids` generates, and its seed.
    """
    from mlbench.pipeline.options import make_options
    from mlbench.pipeline.preprocess import preprocess_array
    from mlbench.samples.synthetic import make_spheroids

    source, mean, std = _manifest_normalization(model)
    rng = np.random.default_rng(seed)
    options = make_options("fixed", normalize="none", input_size=size)
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    inputs = [(preprocess_array(make_spheroids((size, size), int(rng.integers(1, 7)), rng)[0], options)[0] - m) / s
              for _ in range(n)]
    stacked = torch.stack(inputs)  # (n, 3, S, S)
    flat = stacked.transpose(0, 1).reshape(3, -1)
    return Reference(source, tuple(mean), tuple(std), tuple(flat.mean(1).tolist()), tuple(flat.std(1).tolist()),
                     tuple(stacked.mean((2, 3)).std(0).tolist()), flat[:, :: max(1, flat.shape[1] // _SAMPLE)].numpy())


def _hypotheses(ref: Reference) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]]:
    """Mistake code -> (function that undoes it, fix)."""
    m, s = torch.tensor(ref.mean)[:, None, None], torch.tensor(ref.std)[:, None, None]
    c = torch.round(m * 255)  # the mean as uint8, as subtracted by uint8 arithmetic
    return {
        "ok": (lambda x: x, "nothing to fix"),
        "no_mean_std": (lambda x: (x - m) / s, "apply the training mean/std after scaling (normalize='imagenet')"),
        "mean_std_twice": (lambda x: x * s + m, "apply mean/std once: remove the second normalisation"),
        "range_0_255": (lambda x: (x / 255 - m) / s, "divide by 255 (or the bit depth's maximum), then mean/std"),
        "mean_std_on_0_255": (lambda x: ((x * s + m) / 255 - m) / s, "divide by 255 before mean/std, not after"),
        "channel_swap": (lambda x: x.flip(0), "feed RGB, not BGR (cv2 reads BGR: convert with cv2.cvtColor)"),
        "scaled_twice": (lambda x: ((x * s + m) * 255 - m) / s,
                         "divide by 255 once (ToTensor already divides uint8 by 255), then mean/std"),
        "uint8_wraparound": (lambda x: ((torch.round(x * s * 255) + c) % 256 / 255 - m) / s,
                             "convert to float before subtracting the mean: (image.astype(np.float32) / 255 - mean) / std"),
    }


def _score(x: torch.Tensor, ref: Reference) -> float:
    """Distance of a (3, H, W) input from the training inputs; lower is closer.

    Three terms: the de-normalised values must lie in [0, 1] (weight 1 per 5% outside); the
    de-normalised channels must agree (training images are grey with a small tint); and,
    weakly, channel means and log stds near the reference (weak because content varies).
    """
    if not torch.isfinite(x).all():
        return float("inf")
    raw = x * torch.tensor(ref.std)[:, None, None] + torch.tensor(ref.mean)[:, None, None]
    sample = raw.reshape(-1)[:: max(1, raw.numel() // 200_000)]
    low, high = torch.quantile(sample, torch.tensor([0.01, 0.99]))
    outside = ((torch.relu(-0.02 - low) + torch.relu(high - 1.02)) / 0.05) ** 2
    consistency = (raw.std(0).mean() / 0.01) ** 2
    mean, std = x.mean((1, 2)), x.std((1, 2)).clamp_min(1e-6)
    d_mean = ((mean - torch.tensor(ref.input_mean)) / torch.tensor(ref.spread).clamp_min(0.5)) ** 2
    d_std = (torch.log(std / torch.tensor(ref.input_std)) / 0.5) ** 2
    return float(outside + consistency + 0.1 * (d_mean.sum() + d_std.sum()))


@dataclass(frozen=True, eq=False, repr=False)
class NormReport(ReportText):
    """Per-channel statistics of the input, the reference, the diagnosis and its fix. The repr is the report."""

    shape: tuple[int, ...]
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    channel_min: tuple[float, ...]
    channel_max: tuple[float, ...]
    reference: Reference
    diagnosis: str
    fix: str
    scores: dict[str, float]
    problems: tuple[Problem, ...]
    values: np.ndarray = field(repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        keys = ("shape", "channel_mean", "channel_std", "channel_min", "channel_max", "diagnosis", "fix", "scores")
        out = {k: getattr(self, k) for k in keys}
        out["reference"] = {"source": self.reference.source, "mean": self.reference.input_mean,
                            "std": self.reference.input_std}
        out["problems"] = [{"code": p.code, "message": p.message} for p in self.problems]
        out["ok"] = self.ok
        return out

    def _channel_rows(self) -> list[tuple[str, tuple[float, ...]]]:
        ref = self.reference
        return [("input mean", self.channel_mean), ("expected mean", ref.input_mean), ("input std", self.channel_std),
                ("expected std", ref.input_std), ("input min", self.channel_min), ("input max", self.channel_max)]

    def text(self) -> str:
        """The report: the input's channel statistics against the training input's, the diagnosis, the problems."""
        lines = [f"NormReport(input {self.shape}; reference: {self.reference.source})",
                 "  channel" + " " * 9 + "        R        G        B"]
        lines += [f"  {label:<16}" + "".join(f"{v:>9.3f}" for v in values) for label, values in self._channel_rows()]
        lines.append(f"  diagnosis: {self.diagnosis} (fix: {self.fix})")
        return "\n".join(lines + self._problem_lines(self.problems))

    def _repr_html_(self) -> str:
        channels = [(label, *(f"{v:.3f}" for v in values)) for label, values in self._channel_rows()]
        return self._html(self.text().split("\n", 1)[0], (("channel", "R", "G", "B"), channels),
                          (("diagnosis", "fix"), [(self.diagnosis, self.fix)]), self._problem_table(self.problems))

    def plot(self, axes: Any = None) -> Any:
        """Input and training distributions side by side, one histogram per channel.

        Parameters
        ----------
        axes : two matplotlib Axes, optional
            Draw the model input into the first and the training input into the second; by
            default into a new 8 x 2.6 inch Figure whose panels share the y axis.

        Returns
        -------
        matplotlib.figure.Figure
            The Figure drawn on.
        """
        from mlbench.probes.plotting import panel_axes

        fig, axes = panel_axes(axes, 2, name="NormReport.plot", size=(4.0, 2.6), sharey=True)
        for ax, values, title in ((axes[0], self.values, "model input"), (axes[1], self.reference.values, "training input")):
            for channel, colour in enumerate(("tab:red", "tab:green", "tab:blue")):
                ax.hist(values[channel], bins=60, histtype="step", color=colour, density=True, label="RGB"[channel])
            ax.set_title(title)
            ax.set_xlabel("value")
        axes[0].legend(fontsize=7)
        return fig


_MESSAGES = {
    "no_mean_std": "scaled to 0..1 but the training mean/std were not applied (the served /255 bug)",
    "mean_std_twice": "mean/std applied twice: values are squeezed and shifted below the training range",
    "range_0_255": "values span 0..255: the /255 (or bit-depth) scaling is missing",
    "mean_std_on_0_255": "mean/std applied to 0..255 values: scale to 0..1 first",
    "channel_swap": "channel order reversed (BGR fed as RGB)",
    "scaled_twice": "the /255 scaling was applied twice before mean/std: the image spans 1/255 of the expected range",
    "uint8_wraparound": "the mean was subtracted in uint8 arithmetic: dark pixels wrapped around to bright ones",
}


def _as_chw(x: Any) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x).detach().float().cpu()
    if tensor.ndim == 4 and tensor.shape[0] >= 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise OptionsError(f"check_normalization expects a model input of shape (N, 3, H, W) or (3, H, W), got "
                           f"{tuple(tensor.shape)}; pass the preprocess stage's output (run.output('preprocess'))")
    return tensor


def _range_findings(x: torch.Tensor) -> list[Problem]:
    problems = []
    nan = int((~torch.isfinite(x)).sum())
    if nan:
        problems.append(Problem("nonfinite", f"{nan} NaN/Inf values in the input: the output will be NaN"))
        return problems
    std = x.std((1, 2))
    if float(std.min()) < 1e-6:
        problems.append(Problem("constant", f"a channel is constant (std {float(std.min()):.2g}): nothing to segment, and "
                                "per-image standardisation would divide by zero (NaN)"))
    at_max = (x == x.amax((1, 2), keepdim=True)).float().mean()
    if float(at_max) > 0.3 and float(std.min()) >= 1e-6:
        problems.append(Problem("saturated", f"{float(at_max):.0%} of values sit at their channel's maximum: "
                                "the image was clipped (e.g. 16-bit data converted to 8-bit)"))
    return problems


def check_normalization(x: Any, model: str | None = None, *, reference: Reference | None = None,
                        margin: float = 4.0) -> NormReport:
    """Compare a model input with the distribution the weights were trained on.

    Parameters
    ----------
    x : tensor or array, (N, 3, H, W) or (3, H, W)
        The model input after preprocessing (only the first image of a batch is inspected).
    model : str, optional
        Model whose manifest entry gives the training mean/std (ImageNet's otherwise).
    reference : Reference, optional
        A precomputed :func:`training_reference`.
    margin : float
        How much better a mistake's undoing must score than the input as it is to be diagnosed.

    Returns
    -------
    NormReport
        ``diagnosis`` is "ok" or one of no_mean_std, mean_std_twice, range_0_255,
        mean_std_on_0_255, channel_swap, scaled_twice, uint8_wraparound; ``problems`` also flag
        constant, saturated and NaN inputs.

    Raises
    ------
    OptionsError
        When ``x`` does not have 3 channels.
    """
    tensor = _as_chw(x)
    ref = reference or training_reference(model)
    problems = _range_findings(tensor)
    scores = {code: round(_score(undo(tensor), ref), 2) for code, (undo, _) in _hypotheses(ref).items()}
    best = min(scores, key=scores.get)
    diagnosis = best if best != "ok" and scores[best] + margin < scores["ok"] else "ok"
    if diagnosis != "ok":
        problems.insert(0, Problem(diagnosis, _MESSAGES[diagnosis]))
    flat = tensor.reshape(3, -1)
    return NormReport(tuple(tensor.shape), *(tuple(round(float(v), 4) for v in t) for t in
                      (flat.mean(1), flat.std(1), flat.amin(1), flat.amax(1))),
                      ref, diagnosis, _hypotheses(ref)[diagnosis][1], scores, tuple(problems),
                      flat[:, :: max(1, flat.shape[1] // _SAMPLE)].numpy().copy())
