"""The spine of mlbench: a Pipeline of named stages and a Run that steps through them.

A :class:`Run` executes stages one at a time, keeps each stage's output and wall time,
and on an exception keeps the stage name, the exception and the input that caused it.
The widget, the service, the sweep and the case file all use it: there is one
implementation of "segment an image".
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch

from mlbench.errors import MlbenchError, MlbenchWarning, ModelError, OptionsError, StageError
from mlbench.models.cards import card
from mlbench.pipeline.options import STAGE_OF_OPTION, PipelineOptions, make_options, reject_unknown_options
from mlbench.pipeline.result import Segmentation
from mlbench.pipeline.stages import STAGE_NAMES, STAGES, StageContext, describe, image_source
from mlbench.pipeline.train_mode import train_sensitive_modules

__all__ = ["Pipeline", "Run", "StageRecord"]

_INPUT_OF = dict(zip(STAGE_NAMES, (None, *STAGE_NAMES[:-1])))
"""Each stage's input is the previous stage's output (the first reads the image)."""


@dataclass(frozen=True)
class StageRecord:
    """One stage of a run: ``status`` is "pending", "done" or "failed"."""

    name: str
    status: str = "pending"
    output: Any = None
    seconds: float | None = None
    error: BaseException | None = None
    input_summary: str | None = None
    notes: tuple[str, ...] = ()

    def __repr__(self) -> str:
        if self.status == "pending":
            return f"{self.name}: pending"
        took = f"{self.seconds * 1000:.0f} ms"
        if self.status == "failed":
            return f"{self.name}: FAILED after {took}: {type(self.error).__name__}: {self.error} (input: {self.input_summary})"
        notes = "".join(f"; note: {n}" for n in self.notes)
        return f"{self.name}: done in {took} -> {describe(self.output)}{notes}"


class Pipeline:
    """A model plus options; :meth:`start` makes a :class:`Run` over one image.

    Parameters
    ----------
    model : nn.Module or str
        A model, or a bundled name / service id / checkpoint path for :func:`mlbench.load_model`.
    preset : str
        ``"fixed"`` (careful, the default) or ``"as_served"`` (the service's historic behaviour).
    **options
        Any :class:`~mlbench.pipeline.options.PipelineOptions` field, overriding the preset; the
        options left unset take the model's card values (:func:`mlbench.card`).

    Raises
    ------
    ModelError
        For a model in train mode with ``train_mode="refuse"``; with the default ``"eval"`` an
        :class:`~mlbench.errors.MlbenchWarning` names the modules and the forward runs in eval mode.
    """

    def __init__(self, model: torch.nn.Module | str, preset: str = "fixed", **options: Any) -> None:
        requested = make_options(preset, **options)  # a misspelt option fails before a model loads
        if isinstance(model, str):  # a name or a path: the shared, cached copy (loaded once per file version)
            from mlbench.models.loading import shared_model

            model = shared_model(model, device=requested.device)
        if not isinstance(model, torch.nn.Module):
            raise OptionsError(f"model must be a torch.nn.Module or a model name, got {type(model).__name__}")
        self.model, self.preset, self.card = model, preset, card(model)
        self.options = requested.resolved(self.card)
        _check_train_mode(model, self.options.train_mode, self.card.name)

    @property
    def model_name(self) -> str:
        """The model's card name (its registry id for the bundled models)."""
        return self.card.name

    def start(self, image: Any) -> "Run":
        """A fresh Run over ``image`` (path, bytes, an open binary file, a PIL image, a tensor or an
        (H, W[, C]) array); nothing executed yet.

        Raises
        ------
        OptionsError
            For an image of another type (a list, a text file ...).
        """
        return Run(self, image_source(image))

    def __repr__(self) -> str:
        fixed = PipelineOptions().resolved(self.card)
        changed = {k: v for k, v in self.options.to_dict().items() if v != getattr(fixed, k)}
        return f"Pipeline({self.model_name}, preset={self.preset!r}, changed_from_fixed={changed})"


class Run:
    """One image through one pipeline, executed stage by stage."""

    def __init__(self, pipeline: Pipeline, source: Any, records: dict[str, StageRecord] | None = None) -> None:
        self.pipeline = pipeline
        self.source = source
        self.records: dict[str, StageRecord] = records or {name: StageRecord(name) for name in STAGE_NAMES}

    # ---- state -------------------------------------------------------------------
    @property
    def options(self) -> PipelineOptions:
        return self.pipeline.options

    @property
    def stage_names(self) -> tuple[str, ...]:
        return STAGE_NAMES

    @property
    def next_stage(self) -> str | None:
        """Name of the next stage to execute, None when done or failed."""
        if self.failed:
            return None
        return next((n for n in STAGE_NAMES if self.records[n].status == "pending"), None)

    @property
    def done(self) -> bool:
        return all(r.status == "done" for r in self.records.values())

    @property
    def failed(self) -> bool:
        return any(r.status == "failed" for r in self.records.values())

    @property
    def failed_stage(self) -> str | None:
        return next((n for n, r in self.records.items() if r.status == "failed"), None)

    @property
    def error(self) -> BaseException | None:
        """The original exception of the failed stage, if any."""
        name = self.failed_stage
        return self.records[name].error if name else None

    @property
    def outputs(self) -> dict[str, Any]:
        return {n: r.output for n, r in self.records.items() if r.status == "done"}

    def output(self, name: str) -> Any:
        """The output of stage ``name``; raises if that stage has not run."""
        record = self.records.get(name)
        if record is None:
            raise OptionsError(f"no stage named {name!r}; stages are {STAGE_NAMES}")
        if record.status != "done":
            raise MlbenchError(f"stage {name!r} is {record.status}; call run_until({name!r}) first")
        return record.output

    @property
    def timings(self) -> dict[str, float]:
        return {n: r.seconds for n, r in self.records.items() if r.seconds is not None}

    # ---- execution ---------------------------------------------------------------
    def step(self) -> StageRecord:
        """Execute the next stage and return its record (failures are recorded, not raised)."""
        name = self.next_stage
        if name is None:
            state = f"failed at {self.failed_stage!r}" if self.failed else "complete"
            raise MlbenchError(f"the run is {state}; start a new run (pipeline.start(image)) or use with_options()")
        fn = dict(STAGES)[name]
        ctx = StageContext(self.options, self.pipeline.model, self.source, self.outputs, self.pipeline.card)
        feed = _INPUT_OF[name]
        started = time.perf_counter()
        try:
            output = fn(ctx)
        except Exception as exc:  # recorded with the input that caused it
            summary = describe(self.source if feed is None else self.records[feed].output)
            record = StageRecord(name, "failed", None, time.perf_counter() - started, exc, summary)
        else:
            record = StageRecord(name, "done", output, time.perf_counter() - started, notes=tuple(ctx.notes))
        self.records[name] = record
        return record

    def run_until(self, name: str) -> "Run":
        """Execute stages up to and including ``name`` (stops early on failure)."""
        if name not in STAGE_NAMES:
            raise OptionsError(f"no stage named {name!r}; stages are {STAGE_NAMES}")
        while self.records[name].status == "pending" and not self.failed:
            self.step()
        return self

    def run(self) -> "Run":
        """Execute every remaining stage (stops on failure); returns self."""
        return self.run_until(STAGE_NAMES[-1])

    def raise_for_error(self) -> "Run":
        """Raise :class:`StageError` (caused by the original exception) if a stage failed."""
        name = self.failed_stage
        if name:
            exc = self.records[name].error
            raise StageError(
                f"stage {name!r} failed: {type(exc).__name__}: {exc} (input: {self.records[name].input_summary})"
                f"{self._forward_hint(name, exc)}", name
            ) from exc
        return self

    def _forward_hint(self, name: str, exc: BaseException) -> str:
        """What :func:`mlbench.explain_error` says of a failed forward pass: its cause and fix, when it
        knows them (the raw torch message alone names neither)."""
        if name != "forward" or isinstance(exc, MlbenchError):
            return ""
        from mlbench.failures.forward_errors import explain_error

        x = self.records["preprocess"].output
        try:
            why = explain_error(exc, model=self.pipeline.model, input_shape=tuple(x.shape), input_dtype=x.dtype)
        except Exception:  # the explanation is a help; the error it explains is raised either way
            return ""
        return why.hints()

    def with_options(self, **changes: Any) -> "Run":
        """A new Run with changed options that reuses every stage those options cannot affect.

        Moving the threshold re-runs only postprocess and polygons, never the forward pass.

        Raises
        ------
        OptionsError
            For an option name :class:`~mlbench.pipeline.options.PipelineOptions` does not have
            (with the closest valid name) or a value outside its range.
        """
        reject_unknown_options(changes)
        options = replace(self.options, **changes)
        changed = options.changed(self.options)
        first = min((STAGE_NAMES.index(STAGE_OF_OPTION[c]) for c in changed), default=len(STAGE_NAMES))
        pipeline = Pipeline.__new__(Pipeline)
        pipeline.model, pipeline.preset, pipeline.options = self.pipeline.model, self.pipeline.preset, options
        pipeline.card = self.pipeline.card
        records = {n: (self.records[n] if i < first else StageRecord(n)) for i, n in enumerate(STAGE_NAMES)}
        return Run(pipeline, self.source, records)

    def result(self):
        """The :class:`~mlbench.pipeline.result.Segmentation` of a completed run (raises on failure)."""

        self.run().raise_for_error()
        return Segmentation.from_run(self)

    def __repr__(self) -> str:
        lines = [f"Run({self.pipeline.model_name}, preset={self.pipeline.preset!r})"]
        lines += [f"  {record!r}" for record in self.records.values()]
        return "\n".join(lines)


def _check_train_mode(model: torch.nn.Module, policy: str, name: str) -> None:
    """Name the modules a train-mode model would run differently; refuse, or warn that eval mode is used."""
    if policy == "keep":
        return
    modules = train_sensitive_modules(model)
    if not modules:
        return
    listed = ", ".join(modules[:5]) + (f" and {len(modules) - 5} more" if len(modules) > 5 else "")
    what = (f"{name} is in train mode and {len(modules)} module(s) compute differently there ({listed}): "
            "BatchNorm uses batch statistics, Dropout zeroes activations at random")
    if policy == "refuse":
        raise ModelError(f"{what}. Call model.eval() first, or pass train_mode='eval' to run the forward in eval mode")
    warnings.warn(f"{what}; the forward runs in eval mode (the model's own flags are restored). "
                  "Call model.eval() to silence this, or train_mode='keep' to reproduce a train-mode run",
                  MlbenchWarning, stacklevel=3)
