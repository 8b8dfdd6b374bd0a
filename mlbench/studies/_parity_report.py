"""What :func:`mlbench.parity` reports: a :class:`ParityRow` per variant in a :class:`ParityReport`.

The report's text is the table (variant, ran or why not, max |logit diff|, mask IoU, polygons
added/lost, first module that departs, first NaN/Inf) with the notes of each variant; ``.table``
is the same as a DataFrame, ``.modules(variant)`` the module rows behind it, ``.plot()`` the
divergence along the forward, ``.to_dict()`` the JSON the command line prints.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlbench.errors import OptionsError
from mlbench.findings import ReportText
from mlbench.studies.module_diff import TOLERANCES, Tolerance

__all__ = ["ParityRow", "ParityReport"]


@dataclass(frozen=True)
class ParityRow:
    """One variant against the reference.

    ``status`` is "ran", "failed" (``reason`` has the error and the module it came from) or
    "unavailable" (``reason`` says why, e.g. no CUDA, onnxruntime missing). ``compared`` is
    "modules" or "outputs only" (an exported graph). ``first_departure`` is the first module call
    (completion order: the producer before the containers around it) whose output departs beyond
    ``tolerance``, with its type, output shape, ``max |variant - reference|`` and that relative to
    ``max |reference|``; ``output_departs`` whether the raw output as a whole does.
    """

    variant: str
    status: str
    reason: str = ""
    compared: str = ""
    max_logit_diff: float | None = None
    output_departs: bool | None = None
    mask_iou: float | None = None
    polygons_added: int | None = None
    polygons_lost: int | None = None
    first_departure: str | None = None
    departure_type: str | None = None
    departure_shape: str | None = None
    departure_diff: float | None = None
    departure_rel: float | None = None
    first_nonfinite: str | None = None
    tolerance: str = ""
    seconds: float | None = None
    note: str = ""

    def cells(self) -> tuple[str, ...]:
        """The row as the report's text columns."""
        if self.status != "ran":
            return (self.variant, self.status, self.reason)
        if self.first_departure is not None:
            where = (f"{self.first_departure} ({self.departure_type}, {self.departure_shape}): "
                     f"{_num(self.departure_diff)} (rel {_num(self.departure_rel)})")
        elif self.compared != "modules":
            where = "output departs (no module trace)" if self.output_departs else "within tolerance (outputs only)"
        else:
            where = "none: within tolerance"
        polygons = f"+{self.polygons_added}/-{self.polygons_lost}"
        return (self.variant, "ran", f"{_num(self.max_logit_diff)}", f"{self.mask_iou:.4f}", polygons, where,
                self.first_nonfinite or "-")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


_HEADER = ("variant", "status", "max|dlogit|", "mask IoU", "polygons", "first departure: module (type, shape): max|d| (rel)",
           "first NaN/Inf")


@dataclass(frozen=True, repr=False)
class ParityReport(ReportText):
    """The reference and each variant: a row per variant, module curves for :meth:`plot`.

    Attributes
    ----------
    model, image : str
    reference : dict
        How the reference ran: device, dtype, input shape, threads, module calls, seconds,
        polygons, foreground fraction, and the first module with NaN/Inf in its own output.
    rows : tuple of ParityRow
    """

    model: str
    image: str
    reference: dict[str, Any]
    rows: tuple[ParityRow, ...]
    curves: dict[str, tuple[list[dict[str, Any]], Tolerance]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def table(self) -> pd.DataFrame:
        """One row per variant (columns as :class:`ParityRow`), indexed by variant."""
        return pd.DataFrame([asdict(r) for r in self.rows]).set_index("variant")

    def row(self, variant: str) -> ParityRow:
        """The row of ``variant``."""
        for row in self.rows:
            if row.variant == variant:
                return row
        raise OptionsError(f"no variant {variant!r} in this report; it has {[r.variant for r in self.rows]}")

    def modules(self, variant: str) -> pd.DataFrame:
        """Every module call the variant made, compared with the reference's (max_abs, rel, departs)."""
        if variant not in self.curves:
            traced = sorted(self.curves)
            raise OptionsError(f"variant {variant!r} has no module trace (traced: {traced}); exported graphs and "
                               "variants that did not run have none")
        return pd.DataFrame(self.curves[variant][0])

    def text(self) -> str:
        ref = self.reference
        lines = [f"ParityReport({self.model} on {self.image}): reference {ref['device']} {ref['dtype']} batch 1, "
                 f"input {tuple(ref['input_shape'])}, {ref['threads']} thread(s), {ref['module_calls']} module calls, "
                 f"{ref['polygons']} polygon(s)"]
        if ref.get("first_nonfinite"):
            lines.append(f"  the reference itself has NaN/Inf first at {ref['first_nonfinite']}")
        lines += [f"  reference: {note}" for note in ref.get("notes", ())]
        lines.append("  " + " | ".join(_HEADER))
        lines += ["  " + " | ".join(row.cells()) for row in self.rows]
        notes = [f"  {row.variant}: {row.note}" for row in self.rows if row.note]
        if notes:
            lines += ["  notes:"] + notes
        defaults = "; ".join(f"{k} {v}" for k, v in TOLERANCES.items() if k != "float64")
        stride = ref.get("stride", 1)
        rows = "whole" if stride == 1 else f"on every {stride}th row"
        lines.append(f"  default tolerances by compute dtype: {defaults} (see each row's tolerance); module outputs "
                     f"compared {rows}, raw outputs whole")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self._html(self.text().splitlines()[0], (_HEADER, [row.cells() for row in self.rows]))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN and Inf written as the strings "nan", "inf")."""
        return _json_ready({"model": self.model, "image": self.image, "reference": self.reference,
                            "rows": [asdict(r) for r in self.rows],
                            "tolerances": {k: [v.atol, v.rtol] for k, v in TOLERANCES.items()}})

    def plot(self, ax: Any = None) -> Any:
        """Divergence along the forward, one line per traced variant: ``max |variant - reference| /
        max |reference|`` per module call (x: its place in the reference forward), log scale, a dot
        at the first departure and the variant's ``rtol`` dotted. Returns the Figure."""
        from mlbench.image.display import PALETTE, label_colours
        from mlbench.probes.plotting import panel_axes

        figure, (ax,) = panel_axes(ax, 1, name="ParityReport.plot", size=(7.5, 3.4))
        floor, ceiling = 1e-10, 1e3
        fixed = list(PALETTE.values())  # the package's Okabe-Ito colours first, then its label colours
        more = label_colours(np.arange(1, max(len(self.curves) - len(fixed), 0) + 1)).tolist()
        colours = np.asarray(fixed + more, dtype=float)[: len(self.curves)] / 255.0
        for colour, (name, (rows, tolerance)) in zip(colours, self.curves.items()):
            xs = [r["ref_order"] for r in rows]
            ys = [min(max(r["rel"], floor), ceiling) if math.isfinite(r["rel"]) else ceiling for r in rows]
            ax.plot(xs, ys, color=colour, lw=1, label=name)
            first = next((i for i, r in enumerate(rows) if r["departs"]), None)
            if first is not None:
                ax.plot([xs[first]], [ys[first]], "o", color=colour, ms=5)
            ax.axhline(tolerance.rtol, color=colour, ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel(f"module call of the reference forward ({self.reference['module_calls']} in completion order)")
        ax.set_ylabel("max|variant - ref| / max|ref|")
        ax.set_title(f"{self.model}: where each variant parts from the reference (0 drawn at {floor:g})", fontsize=9)
        if self.curves:
            ax.legend(fontsize=7, loc="lower right")
        return figure


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value
