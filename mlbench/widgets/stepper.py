"""``mb.widgets.Stepper``: walk one image through the pipeline, stage by stage, with any model.

The widget holds controls, layout and a position; every piece of work is a call on the
core :class:`~mlbench.Run` (``step``, ``with_options``) or on :func:`mlbench.load_model`. Each
control action is one plain method (:meth:`Stepper.next`, :meth:`back`, :meth:`run_all`,
:meth:`reset`, :meth:`add_model`, :meth:`open_image`, or setting a control's ``.value``), so the
widget is testable headless. The controls and their drawing live in :mod:`mlbench.widgets.panel`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mlbench.models import list_models
from mlbench.models.cards import ModelCard, card
from mlbench.models.loading import shared_model
from mlbench.pipeline.run import Pipeline, Run
from mlbench.pipeline.stages import STAGE_NAMES
from mlbench.samples.bundled import list_samples
from mlbench.widgets.choices import ImageChoices, ModelChoices, ModelSource
from mlbench.widgets.panel import StepperPanel
from mlbench.widgets.views import StageView, stage_view

__all__ = ["Stepper"]

CUSTOM = "<your image>"


class Stepper(StepperPanel):
    """Step an image through decode -> preprocess -> forward -> postprocess -> polygons.

    Parameters
    ----------
    model : str, Path, nn.Module or mapping, optional
        The model selected first: a bundled name, a checkpoint path, a module (with or without a
        card), or ``{display name: any of those}`` (the first is selected). Default: the first of
        ``models``, else ``"cbam_resunet"``.
    image : str, path, bytes or (H, W[, C]) array
        A sample name (:func:`mlbench.list_samples`; its ground truth is used) or any image source
        (shown as ``<your image>``).
    preset : "fixed" or "as_served"
    threshold : float
        Foreground threshold, 0.1..0.9 like the service's API.
    model_loader : callable, optional
        ``name or path -> nn.Module``; default :func:`~mlbench.models.loading.shared_model` (bundled weights,
        checkpoints; loaded once, shared with ``mb.segment`` and ``mb.Pipeline``; inference only).
    models : str, Path, nn.Module, list or mapping, optional
        The model dropdown (default: every bundled model), e.g.
        ``{"production": "weights/hrnet_best_model.pth", "candidate": net}``. A module is listed
        under its card's name, a path under its file stem, unless the mapping names them; a bundled
        name is never given to a model that is not that bundled model (``"hrnet (checkpoint)"``).
        Each is loaded once, when first selected.
    samples : list of str, optional
        The image dropdown (default: every sample).
    **options
        Further :class:`~mlbench.PipelineOptions` for every run (e.g. ``input_size=256``).

    Attributes
    ----------
    run : Run or None
        The current run (None when the model could not be loaded; see ``error``).
    result : Segmentation or None
        The segmentation once every stage is done.
    position : int
        Index of the stage on view, -1 before the first Next.
    model, model_card : nn.Module or None, ModelCard or None
        The selected model and its card (None until it loaded).
    notice : str
        Why the last :meth:`add_model` or :meth:`open_image` did nothing ("" otherwise); also in ``status``.
    status, card_view : ipywidgets.HTML
        The status line (what runs, or the error) and the selected model's card.
    """

    def __init__(self, model: ModelSource | Mapping[str, ModelSource] | None = None, image: Any = "spheroids_8bit", *,
                 preset: str = "fixed", threshold: float = 0.5, model_loader: Callable[[Any], torch.nn.Module] | None = None,
                 models: ModelSource | Mapping[str, ModelSource] | list | None = None, samples: list[str] | None = None,
                 **options: Any) -> None:
        self.choices = ModelChoices(model_loader or shared_model)
        selected = self._first_model(model, models)
        self.image_choices = ImageChoices(samples if samples is not None else list_samples())
        if isinstance(image, str) and image in self.image_choices.samples:
            image_name = image
        else:
            image_name = self.image_choices.add(CUSTOM, image)
        self._options = options
        self._views: dict[tuple[str, int | None], tuple[Any, StageView]] = {}
        self.run: Run | None = None
        self.error: BaseException | None = None
        self.position, self.notice = -1, ""
        self._build_controls(self.choices.names, selected, self.image_choices.names, image_name, preset, threshold)
        self._restart()

    def _first_model(self, model: Any, models: Any) -> str:
        listed = self.choices.extend(list_models() if models is None else models)
        chosen = self.choices.extend(model) if model is not None else []
        return (chosen or listed or self.choices.extend("cbam_resunet"))[0]

    # ---- state ---------------------------------------------------------------------
    @property
    def stage(self) -> str | None:
        """Name of the stage on view (None before the first Next)."""
        return STAGE_NAMES[self.position] if self.position >= 0 else None

    @property
    def result(self):
        """The :class:`~mlbench.Segmentation` once every stage is done, else None."""
        return self.run.result() if self.run is not None and self.run.done else None

    @property
    def model(self) -> torch.nn.Module | None:
        """The selected model, None until it loaded."""
        return self.choices.loaded.get(self.model_select.value)

    @property
    def model_card(self) -> ModelCard | None:
        """The selected model's card (:func:`mlbench.card`), None until it loaded."""
        return None if self.model is None else card(self.model)

    @property
    def view(self) -> StageView | None:
        """The view of the stage on view at the chosen picture size (None before the first Next or without a model)."""
        if self.run is None or self.stage is None:
            return None
        side = self.size_toggle.value or None  # 0: full size
        record, key = self.run.records[self.stage], (self.stage, side)
        cached = self._views.get(key)
        if cached is None or cached[0] is not record:
            _, image, truth = self.image_choices.get(self.image_select.value)
            cached = (record, stage_view(self.run, self.stage, image, truth, side))
            self._views[key] = cached
        return cached[1]

    def _model(self) -> torch.nn.Module:
        name = self.model_select.value
        if name not in self.choices.loaded:
            self._say(f"loading model {name}")
        return self.choices.load(name)

    # ---- actions (each one plain call on the core) -------------------------------------
    def _restart(self) -> None:
        """New pipeline from the controls; re-run up to the stage that was on view."""
        with self._busy("starting"):
            self.error, self.run = None, None
            try:
                pipeline = Pipeline(self._model(), preset=self.preset_toggle.value, threshold=self.threshold_slider.value, **self._options)
                self.run = pipeline.start(self.image_choices.get(self.image_select.value)[0])
            except Exception as exc:  # a missing file, a checkpoint that fits nothing, a bad option: shown, not raised
                self.error = exc
            self._catch_up()

    def _catch_up(self) -> None:
        if self.run is not None and self.position >= 0:
            self._execute(STAGE_NAMES[self.position])
            failed = self.run.failed_stage
            if failed is not None:
                self.position = min(self.position, STAGE_NAMES.index(failed))

    def _execute(self, target: str) -> None:
        """Run the pending stages up to ``target``, saying which one runs (stops at a failure)."""
        while self.run.records[target].status == "pending" and not self.run.failed:
            self._say(f"running {self.run.next_stage} ({self.model_select.value})")
            self.run.step()

    def next(self) -> None:
        """Show the next stage, executing it when it has not run yet."""
        if self.run is None or self.position + 1 >= len(STAGE_NAMES):
            return
        target = STAGE_NAMES[self.position + 1]
        with self._busy(f"running {target}"):
            self._execute(target)
            if self.run.records[target].status != "pending":
                self.position += 1

    def back(self) -> None:
        """Show the previous stage (nothing is executed)."""
        with self._busy("drawing"):
            self.position = max(0, self.position - 1) if self.position >= 0 else -1

    def run_all(self) -> None:
        """Execute every remaining stage and show the last one (or the one that failed)."""
        if self.run is None:
            return
        with self._busy("running"):
            self._execute(STAGE_NAMES[-1])
            self.position = STAGE_NAMES.index(self.run.failed_stage or STAGE_NAMES[-1])

    def reset(self) -> None:
        """Forget every stage output and go back to the start (same controls)."""
        self.position = -1
        self._restart()

    def set_threshold(self, threshold: float) -> None:
        """Re-threshold: only postprocess and polygons run again (``Run.with_options``)."""
        if abs(self.threshold_slider.value - threshold) > 1e-12:
            self.threshold_slider.value = threshold  # its observer calls back here
            return
        with self._busy("thresholding"):
            if self.run is not None:
                self.run = self.run.with_options(threshold=float(threshold))
            self._catch_up()

    def add_model(self, source: ModelSource, name: str | None = None) -> str | None:
        """Add a model under ``name``, load it and select it (the "Add model" button: the ``model_path`` text).

        Parameters
        ----------
        source : str, Path or nn.Module
            A checkpoint path, a bundled name or a module.
        name : str, optional
            Its display name (default: the file stem, the card's name, the bundled name).

        Returns
        -------
        str or None
            The display name; None when it could not be loaded (``notice`` and the status say why,
            the dropdown is unchanged).
        """
        source = source.strip() if isinstance(source, str) else source
        before = set(self.choices.names)
        with self._busy(f"loading model {source}"):
            if isinstance(source, str) and not source:
                self.notice = "no model given: type the path of a checkpoint in the model path field"
                return None
            try:
                label = self.choices.add(source, name)
                self.choices.load(label)
            except Exception as exc:  # a missing or unfitting checkpoint: said in the status, not raised
                for new in set(self.choices.names) - before:
                    self.choices.remove(new)
                self.notice = f"could not add model {str(source)!r}: {type(exc).__name__}: {exc}"
                return None
            self._set_choices(self.model_select, self.choices.names, label)
        return label

    def open_image(self, source: Any, name: str | None = None) -> str | None:
        """Open an image and select it (the "Open image" button: the ``image_path`` text).

        Parameters
        ----------
        source : str, Path, bytes or (H, W[, C]) array
            A sample name, an image file, an encoded image or pixels.
        name : str, optional
            Its display name (default ``file: <file name>`` for a path, ``<your image>`` otherwise).

        Returns
        -------
        str or None
            The display name; None when a path is not a file (``notice`` and the status say so).
        """
        source = source.strip() if isinstance(source, str) else source
        with self._busy("opening image"):
            if isinstance(source, str) and source in self.image_choices.samples:
                label = source
            elif isinstance(source, (str, Path)):
                path = Path(source).expanduser()
                if not path.is_file():
                    self.notice = (f"image {str(source)!r} is not a file (absolute path tried {path.absolute()}); "
                                   "check the path, relative paths resolve against the working directory")
                    return None
                label = self.image_choices.add(name or f"file: {path.name}", str(path))
            else:
                label = self.image_choices.add(name or CUSTOM, bytes(source) if isinstance(source, memoryview) else source)
            self._set_choices(self.image_select, self.image_choices.names, label)
        return label

    def _add_uploads(self, files: Any) -> None:
        for item in files or ():
            self.open_image(bytes(item["content"]), f"upload: {item['name']}")
