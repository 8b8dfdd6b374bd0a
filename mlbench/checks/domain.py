"""``check_domain``: is this image of the kind the model was trained on, before anyone trusts a score?

A model trained on bright-field spheroids (dark bodies on a bright background) given a
fluorescence image (bright nuclei on black) raises nothing and returns a confident, useless mask.
:func:`check_domain` measures the image as the model sees it (intensities after the card's
scaling, object polarity and size), the model's own feature statistics on it and the confidence
of its output (:mod:`mlbench.checks.domain_stats`), compares each with the training distribution
and says "outside what this model saw" with the evidence: the statistic, the image's value and
the training range. The training distribution comes from the weights manifest (``domain``, written
by ``python -m mlbench.train``) for the bundled models, or from in-domain images the user names.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlbench.checks.domain_stats import (CONFIDENCE_STATISTICS, IMAGE_STATISTICS, layer_distance, measure_images,
                                         resolve_reference)
from mlbench.errors import OptionsError
from mlbench.findings import Problem, ReportText
from mlbench.models.cards import card
from mlbench.pipeline.run import Pipeline

__all__ = ["Evidence", "DomainReport", "check_domain", "MARGIN", "FLOORS", "ACTIVATION_MARGIN"]

MARGIN = 0.25
"""A statistic is allowed this fraction of its training range's width beyond either end."""
FLOORS = {"p1": 0.05, "median": 0.05, "p99": 0.05, "contrast": 0.05, "background": 0.05, "polarity": 0.5,
          "object_radius": 3.0, "foreground": 0.05, "uncertain": 0.05, "mean_confidence": 0.05}
"""The least margin per statistic (intensities in [0, 1] units, radius in model-input pixels)."""
ACTIVATION_MARGIN = 1.25
"""A layer's distance may reach this multiple of the largest distance of a training image."""
IN_DOMAIN, OUTSIDE, UNKNOWN = "in domain", "outside what this model saw", "cannot judge"
_GROUPS = {"intensity": ("p1", "median", "p99", "contrast", "background"), "polarity": ("polarity",),
           "object_size": ("object_radius",)}
_FIX = ("do not trust scores on this image. Retrain or fine-tune on labelled images of this kind (modality, "
        "contrast, object size), or use a model trained on them; invert the intensities only if the modality is "
        "really the same (a bright-field image saved inverted), resize only for the same objects at another "
        "magnification, and check again")


@dataclass(frozen=True)
class Evidence:
    """One statistic of the image (``kind`` image, activations or confidence) against training.

    ``low``..``high`` is the training range (activations: 0 to the largest training distance);
    ``allowed`` the range with its margin.
    """

    kind: str
    name: str
    value: float
    low: float
    high: float
    allowed: tuple[float, float]

    @property
    def outside(self) -> bool:
        return not self.allowed[0] <= self.value <= self.allowed[1]

    @property
    def position(self) -> float:
        """Where the value lies: 0..1 across the training range, +-0.25 beyond it at the allowed edge."""
        if self.value < self.low:
            return -MARGIN * (self.low - self.value) / max(self.low - self.allowed[0], 1e-9)
        if self.value > self.high:
            return 1 + MARGIN * (self.value - self.high) / max(self.allowed[1] - self.high, 1e-9)
        return (self.value - self.low) / (self.high - self.low) if self.high > self.low else 0.5

    def cells(self) -> tuple[str, str, str, str]:
        """statistic, image value, training range, allowed range: as the report shows them."""
        f = ".2f" if self.kind == "activations" or self.name in ("polarity", "object_radius") else ".3f"
        low = "" if self.kind == "activations" else f"{self.allowed[0]:{f}}.."
        return (f"{self.kind} {self.name}", f"{self.value:{f}}", f"{self.low:{f}}..{self.high:{f}}",
                f"{low}{self.allowed[1]:{f}}")


@dataclass(frozen=True, repr=False)
class DomainReport(ReportText):
    """The verdict (in domain, outside what this model saw, cannot judge), its evidence and the fix."""

    model: str
    image: str
    source: str
    verdict: str
    evidence: tuple[Evidence, ...]
    problems: tuple[Problem, ...]
    fix: str

    @property
    def ok(self) -> bool:
        """True only when a reference exists and nothing is outside it ("cannot judge" is not ok)."""
        return self.verdict == IN_DOMAIN

    @property
    def outside(self) -> tuple[Evidence, ...]:
        return tuple(e for e in self.evidence if e.outside)

    def to_dict(self) -> dict[str, Any]:
        rows = [{"kind": e.kind, "name": e.name, "value": round(e.value, 4), "training": [e.low, e.high],
                 "allowed": list(e.allowed), "outside": e.outside} for e in self.evidence]
        return {"model": self.model, "image": self.image, "reference": self.source, "verdict": self.verdict,
                "ok": self.ok, "evidence": rows, "problems": [{"code": p.code, "message": p.message} for p in self.problems],
                "fix": self.fix}

    def text(self) -> str:
        lines = [f"DomainReport({self.model} on {self.image})", f"  reference: {self.source}",
                 f"  verdict: {self.verdict}"]
        lines += [f"  {'statistic':<38}{'image':>7}  {'training':<15}allowed"] if self.evidence else []
        for e in self.evidence:
            name, value, training, allowed = e.cells()
            lines.append(f"  {name:<38}{value:>7}  {training:<15}{allowed:<15}{'OUTSIDE' if e.outside else ''}".rstrip())
        lines += self._problem_lines(self.problems) + [f"  fix: {self.fix}"]
        return "\n".join(textwrap.fill(line, 110, subsequent_indent="      ", break_on_hyphens=False) for line in lines)

    def _repr_html_(self) -> str:
        rows = [(*e.cells(), "outside" if e.outside else "") for e in self.evidence]
        return self._html(f"DomainReport({self.model} on {self.image}): {self.verdict}",
                          (("statistic", "image", "training", "allowed", ""), rows), self._problem_table(self.problems),
                          (("fix",), [(self.fix,)]))

    def plot(self, ax: Any = None) -> Any:
        """Each statistic's place against its training range: 0..1 is the range, the dashed lines the
        allowed margin; red dots are outside.

        Parameters
        ----------
        ax : matplotlib Axes, optional
            Where to draw; by default a new 5 x (0.25 per row) inch Figure.

        Returns
        -------
        matplotlib.figure.Figure
        """
        from mlbench.probes.plotting import panel_axes

        fig, (ax,) = panel_axes(ax, 1, name="DomainReport.plot", size=(5.0, 0.9 + 0.25 * len(self.evidence)))
        rows = list(self.evidence)[::-1]
        ax.axvspan(0, 1, color="0.85", label="training range")
        for edge in (-MARGIN, 1 + MARGIN):
            ax.axvline(edge, color="0.5", linestyle="--", linewidth=0.8)
        for y, e in enumerate(rows):
            x = float(np.clip(e.position, -2.0, 3.0))
            ax.plot(x, y, "o", color="tab:red" if e.outside else "tab:blue", markersize=5)
            ax.annotate(e.cells()[1], (x, y), xytext=(5, -3), textcoords="offset points", fontsize=7)
        ax.set_yticks(range(len(rows)), [e.cells()[0] for e in rows], fontsize=8)
        ax.set_xlim(-2.2, 3.5)
        ax.set_xlabel("position against training (0..1 = training range)", fontsize=8)
        ax.set_title(f"{self.model}: {self.verdict}", fontsize=9)
        return fig


def _range_evidence(kind: str, name: str, value: float, summary: Mapping[str, float]) -> Evidence:
    low, high = float(summary["min"]), float(summary["max"])
    margin = max(MARGIN * (high - low), FLOORS.get(name, 0.0))
    bounds = {"polarity": (-1.0, 1.0), "object_radius": (0.0, math.inf)}.get(name, (0.0, 1.0))  # what it can take
    allowed = (round(max(low - margin, bounds[0]), 4), round(min(high + margin, bounds[1]), 4))
    return Evidence(kind, name, float(value), low, high, allowed)


def _layer_evidence(layer: Mapping[str, Any], vector: np.ndarray | None) -> Evidence:
    at = f"{layer['module']} input" if layer["at"] == "input" else layer["module"]
    value = math.inf if vector is None else layer_distance(vector, layer)
    top = float(layer["train_max"])
    return Evidence("activations", f"{layer['role']} ({at})", value, 0.0, top, (0.0, round(ACTIVATION_MARGIN * top, 4)))


def _evidence(measured: Mapping[str, Any], reference: Mapping[str, Any]) -> list[Evidence]:
    rows = [_range_evidence("image", n, measured["image"][n], reference["image"][n]) for n in IMAGE_STATISTICS]
    rows += [_layer_evidence(layer, measured["layers"].get(layer["role"])) for layer in reference["layers"]]
    rows += [_range_evidence("confidence", n, measured["confidence"][n], reference["confidence"][n])
             for n in CONFIDENCE_STATISTICS]
    return rows


def _listed(rows: list[Evidence]) -> str:
    """``name value (training low..high)``, for activations ``(at most H in training, allowed A)``."""
    cells = [(e.kind, *e.cells()) for e in rows]
    return ", ".join(f"{name.split(' ', 1)[1]} {value} (at most {training.split('..')[1]} in training, allowed {allowed})"
                     if kind == "activations" else f"{name.split(' ', 1)[1]} {value} (training {training})"
                     for kind, name, value, training, allowed in cells)


def _problems(evidence: list[Evidence]) -> list[Problem]:
    out = [e for e in evidence if e.outside]
    problems = []
    for code, names in _GROUPS.items():
        rows = [e for e in out if e.kind == "image" and e.name in names]
        if rows:
            problems.append(Problem(code, _MESSAGES[code] + _listed(rows)))
    for code, kind in (("activations", "activations"), ("confidence", "confidence")):
        rows = [e for e in out if e.kind == kind]
        if rows:
            problems.append(Problem(code, _MESSAGES[code] + _listed(rows)))
    return problems


_MESSAGES = {
    "intensity": "intensities outside the training range (after the card's scaling): ",
    "polarity": "object polarity differs (-1: objects darker than the background, +1: brighter; another contrast "
                "or modality, e.g. fluorescence instead of bright-field): ",
    "object_size": "object size (median radius at the model input, px) unlike training: ",
    "activations": f"the model's features are unlike a training image's (distance above {ACTIVATION_MARGIN}x the "
                   "largest training distance): ",
    "confidence": "the output's confidence profile is unlike training: ",
}


def _shown_name(name: str) -> str:
    """A file's name without its folders; ``<array>`` as it is."""
    return name if name.startswith("<") else Path(name).name


def _as_model(model: Any) -> torch.nn.Module:
    if isinstance(model, str):
        from mlbench.models.loading import load_model

        return load_model(model)
    if not isinstance(model, torch.nn.Module):
        raise OptionsError(f"model must be a torch.nn.Module or a bundled model name, got {type(model).__name__}; "
                           "e.g. mb.check_domain(image, 'cbam_resunet') or mb.check_domain(image, mb.load_model(path))")
    return model


def check_domain(image: Any, model: Any, *, preset: str = "fixed", reference: Any = None) -> DomainReport:
    """Is ``image`` of the kind ``model`` was trained on? Say so, with the evidence, before trusting a score.

    Parameters
    ----------
    image : str, Path or array (H, W[, C])
        The image as the pipeline reads it.
    model : nn.Module or str
        A model (its card says how it sees images) or a bundled model name.
    preset : str
        The pipeline preset the image is measured through (``"fixed"``; ``"as_served"`` shows what
        the historic service fed the model).
    reference : list of paths or arrays, or dict, optional
        In-domain images (8 or more) to compute the training distribution from, or a record made by
        :func:`mlbench.checks.domain_stats.domain_reference`. By default the manifest's ``domain``
        entry of the bundled weights whose sha256 the model's card carries.

    Returns
    -------
    DomainReport
        ``verdict`` "in domain", "outside what this model saw" (``problems`` name the statistics:
        intensity, polarity, object_size, activations, confidence) or "cannot judge" (no reference:
        ``ok`` is False and the problem says how to give one).

    Raises
    ------
    OptionsError
        For a model that is not an ``nn.Module`` or a name, an unknown preset, or a reference that
        is not a list of images or a reference record.
    StageError
        When the pipeline cannot run the image (unreadable file, a size the model refuses).

    Examples
    --------
    >>> import mlbench as mb
    >>> report = mb.check_domain(mb.load_sample("nuclei_stardist").path, "cbam_resunet")
    >>> report.verdict, [p.code for p in report.problems][:3]
    ('outside what this model saw', ['intensity', 'polarity', 'object_size'])
    >>> mb.check_domain(mb.load_sample("spheroids_8bit").path, "cbam_resunet").ok
    True
    """
    model = _as_model(model)
    ref, source = resolve_reference(model, reference, preset)
    model_name = card(model).name or type(model).__name__
    if ref is None:  # nothing to compare with: read the image (it must be readable), run no forward
        decoded = Pipeline(model, preset).start(image).run_until("decode").raise_for_error().output("decode")
        problem = Problem("no_reference", f"no training statistics for {model_name} (no manifest entry with a domain "
                          "record matches its weights' sha256) and no reference images: pass reference=[8 or more "
                          "images you know are in-domain], or for the bundled models run "
                          "`python -m mlbench.train --domain-only`")
        return DomainReport(model_name, _shown_name(decoded.report.name), source, UNKNOWN, (), (problem,),
                            "give a reference, then check again")
    layers = [{k: layer[k] for k in ("role", "module", "at")} for layer in ref["layers"]]
    (measured,), _ = measure_images(model, [image], layers, preset)
    name = _shown_name(measured["name"])
    evidence = _evidence(measured, ref)
    problems = _problems(evidence)
    verdict, fix = (OUTSIDE, _FIX) if problems else (IN_DOMAIN, "nothing to fix: the image looks like the training data")
    return DomainReport(model_name, name, source, verdict, tuple(evidence), tuple(problems), fix)
