"""``mb.widgets.Stepper``: walk one image through the pipeline, stage by stage.

The widget holds controls, layout and a position; every piece of work is a call on the
core :class:`~mlbench.Run` (``step``, ``run``, ``run_until``, ``with_options``). Each
control action is one plain method (:meth:`Stepper.next`, :meth:`back`, :meth:`run_all`,
:meth:`reset`, or setting a control's ``.value``), so the widget is testable headless.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from mlbench.errors import MlbenchError
from mlbench.models import list_models
from mlbench.pipeline.run import Pipeline, Run
from mlbench.samples.bundled import list_samples, load_sample
from mlbench.pipeline.options import PRESET_NAMES
from mlbench.pipeline.stages import STAGE_NAMES
from mlbench.widgets.html import strip_html, view_html
from mlbench.metrics import pixel_scores
from mlbench.widgets.views import StageView, pending_view, stage_view
from mlbench.models.cards import card

__all__ = ["Stepper"]

CUSTOM = "<your image>"


def _default_loader(name: str) -> torch.nn.Module:
    from mlbench.models.loading import load_model

    return load_model(name)


class Stepper:
    """Step an image through decode -> preprocess -> forward -> postprocess -> polygons.

    Parameters
    ----------
    model : str or nn.Module
        Model name (loaded with ``model_loader``) or a ready model (its ``mlbench_name`` is selected).
    image : str, path, bytes or (H, W[, C]) array
        A sample name (:func:`mlbench.list_samples`; its ground truth is used) or any image source.
    preset : "fixed" or "as_served"
    threshold : float
        Foreground threshold, 0.1..0.9 like the service's API.
    model_loader : callable, optional
        ``name -> nn.Module``; default :func:`mlbench.load_model` (the bundled trained weights).
    models, samples : list of str, optional
        Choices of the dropdowns (default: every model, every sample).
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
    """

    def __init__(self, model: str | torch.nn.Module = "cbam_resunet", image: Any = "spheroids_8bit", *,
                 preset: str = "fixed", threshold: float = 0.5, model_loader: Callable[[str], torch.nn.Module] | None = None,
                 models: list[str] | None = None, samples: list[str] | None = None, **options: Any) -> None:
        self._loader = model_loader or _default_loader
        self._models: dict[str, torch.nn.Module] = {}
        if isinstance(model, torch.nn.Module):
            name = card(model).name
            self._models[name], model = model, name
        self._sources: dict[str, tuple[Any, np.ndarray | None, np.ndarray | None]] = {}
        sample_names = list(samples if samples is not None else list_samples())
        if isinstance(image, str) and image in sample_names:
            image_name = image
        else:
            image_name, self._sources[CUSTOM] = CUSTOM, (image, None, None)
        self._options = options
        self._views: dict[str, tuple[Any, StageView]] = {}
        self.run: Run | None = None
        self.error: BaseException | None = None
        self.position = -1
        self._build_controls(list(models or list_models()), model, sample_names, image_name, preset, threshold)
        self._restart()

    # ---- controls and layout -------------------------------------------------------
    def _build_controls(self, models, model, samples, image, preset, threshold) -> None:
        import ipywidgets as w

        names = samples + ([CUSTOM] if CUSTOM in self._sources else [])
        self.model_select = w.Dropdown(options=models if model in models else models + [model], value=model, description="model")
        self.image_select = w.Dropdown(options=names, value=image, description="image")
        self.upload = w.FileUpload(accept="image/*,.tif,.tiff", multiple=False, description="upload")
        self.preset_toggle = w.ToggleButtons(options=list(PRESET_NAMES), value=preset, description="preset",
                                             style={"description_width": "initial", "button_width": "90px"})
        self.threshold_slider = w.FloatSlider(value=threshold, min=0.1, max=0.9, step=0.05, description="threshold",
                                              continuous_update=False, readout_format=".2f")
        self.back_button, self.next_button = w.Button(description="Back", icon="arrow-left"), w.Button(description="Next", icon="arrow-right")
        self.run_all_button, self.reset_button = w.Button(description="Run all", icon="forward"), w.Button(description="Reset", icon="undo")
        for button, action in ((self.back_button, self.back), (self.next_button, self.next),
                               (self.run_all_button, self.run_all), (self.reset_button, self.reset)):
            button.add_class(f"mlbench-{button.description.lower().replace(' ', '-')}")
            button.on_click(lambda _button, act=action: act())
        self.model_select.observe(lambda _change: self._restart(), names="value")
        self.image_select.observe(lambda _change: self._restart(), names="value")
        self.preset_toggle.observe(lambda _change: self._restart(), names="value")
        self.threshold_slider.observe(lambda change: self.set_threshold(change["new"]), names="value")
        self.upload.observe(lambda change: self._add_uploads(change["new"]), names="value")
        self.strip, self.view_text, self.images = w.HTML(), w.HTML(), w.HBox()
        self.strip.add_class("mlbench-strip-widget")
        self.widget = w.VBox([
            w.HBox([self.model_select, self.image_select, self.upload]),
            w.HBox([self.preset_toggle, self.threshold_slider]),
            w.HBox([self.back_button, self.next_button, self.run_all_button, self.reset_button]),
            self.strip, self.view_text, self.images,
        ])
        self.widget.add_class("mlbench-stepper")

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = self.summary()
        return bundle

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
    def view(self) -> StageView | None:
        """The view of the stage on view (None before the first Next or without a model)."""
        if self.run is None or self.stage is None:
            return None
        record = self.run.records[self.stage]
        cached = self._views.get(self.stage)
        if cached is None or cached[0] is not record:
            _, image, truth = self._source()
            cached = (record, stage_view(self.run, self.stage, image, truth))
            self._views[self.stage] = cached
        return cached[1]

    def _source(self) -> tuple[Any, np.ndarray | None, np.ndarray | None]:
        name = self.image_select.value
        if name not in self._sources:
            sample = load_sample(name)
            self._sources[name] = (sample.path, sample.image, sample.mask)
        return self._sources[name]

    def _model(self) -> torch.nn.Module:
        name = self.model_select.value
        if name not in self._models:
            self._models[name] = self._loader(name)
        return self._models[name]

    # ---- actions (each one plain call on the core Run) -------------------------------
    def _restart(self) -> None:
        """New pipeline from the controls; re-run up to the stage that was on view."""
        self.error, self.run = None, None
        try:
            pipeline = Pipeline(self._model(), preset=self.preset_toggle.value, threshold=self.threshold_slider.value, **self._options)
            self.run = pipeline.start(self._source()[0])
        except MlbenchError as exc:  # a missing weights file or a bad option: shown, not raised
            self.error = exc
        self._catch_up()

    def _catch_up(self) -> None:
        if self.run is not None and self.position >= 0:
            self.run.run_until(STAGE_NAMES[self.position])
            failed = self.run.failed_stage
            if failed is not None:
                self.position = min(self.position, STAGE_NAMES.index(failed))
        self._render()

    def next(self) -> None:
        """Show the next stage, executing it when it has not run yet."""
        if self.run is None or self.position + 1 >= len(STAGE_NAMES):
            return
        target = STAGE_NAMES[self.position + 1]
        if self.run.records[target].status == "pending" and not self.run.failed:
            self.run.step()
        if self.run.records[target].status != "pending":
            self.position += 1
        self._render()

    def back(self) -> None:
        """Show the previous stage (nothing is executed)."""
        self.position = max(0, self.position - 1) if self.position >= 0 else -1
        self._render()

    def run_all(self) -> None:
        """Execute every remaining stage and show the last one (or the one that failed)."""
        if self.run is None:
            return
        self.run.run()
        self.position = STAGE_NAMES.index(self.run.failed_stage or STAGE_NAMES[-1])
        self._render()

    def reset(self) -> None:
        """Forget every stage output and go back to the start (same controls)."""
        self.position = -1
        self._restart()

    def set_threshold(self, threshold: float) -> None:
        """Re-threshold: only postprocess and polygons run again (``Run.with_options``)."""
        if abs(self.threshold_slider.value - threshold) > 1e-12:
            self.threshold_slider.value = threshold  # its observer calls back here
            return
        if self.run is not None:
            self.run = self.run.with_options(threshold=float(threshold))
        self._catch_up()

    def _add_uploads(self, files: Any) -> None:
        for item in files or ():
            label = f"upload: {item['name']}"
            self._sources[label] = (bytes(item["content"]), None, None)
            if label not in self.image_select.options:
                self.image_select.options = tuple(self.image_select.options) + (label,)
            self.image_select.value = label

    # ---- rendering -------------------------------------------------------------------
    def _render(self) -> None:
        import ipywidgets as w

        if self.run is None:
            self.strip.value = ""
            self.view_text.value = f'<pre class="mlbench-error" style="color:#d55e00">{self._error_text()}</pre>'
            self.images.children = ()
            self._enable(False, False)
            return
        self.strip.value = strip_html(self.run.records, self.stage)
        view = self.view or pending_view(STAGE_NAMES[0])
        self.view_text.value = view_html(view)
        boxes = []
        for image in view.images:
            picture = w.Image(value=image.png, format="png")
            picture.add_class(f"mlbench-img-{image.key}")
            boxes.append(w.VBox([picture, w.HTML(f"<small>{image.caption}</small>")]))
        self.images.children = tuple(boxes)
        at_end = self.position + 1 >= len(STAGE_NAMES) or self.run.failed and self.run.records[STAGE_NAMES[self.position + 1]].status == "pending"
        self._enable(self.position > 0, not at_end)

    def _enable(self, back: bool, forward: bool) -> None:
        self.back_button.disabled = not back
        self.next_button.disabled = self.run_all_button.disabled = not forward

    def _error_text(self) -> str:
        import html

        return html.escape(f"{type(self.error).__name__}: {self.error}")

    def summary(self) -> str:
        """A stable text summary: controls, stage states and the report of the stage on view."""
        head = (f"Stepper(model={self.model_select.value}, image={self.image_select.value}, "
                f"preset={self.preset_toggle.value}, threshold={self.threshold_slider.value:.2f})")
        if self.run is None:
            return f"{head}\n  no run: {type(self.error).__name__}: {self.error}"
        states = " | ".join(f"{n}: {r.status}" for n, r in self.run.records.items())
        view = self.view
        body = view.text if view is not None else "nothing on view yet: press Next"
        lines = [head] + ([f"  options: {', '.join(f'{k}={v!r}' for k, v in sorted(self._options.items()))}"] if self._options else [])
        lines.append(f"  {states}")
        if self.run.done:
            lines.append(f"  result: {self._result_line()}")
        lines.append(f"  on view: {self.stage or '-'}")
        return "\n".join(lines + [f"  {line}" for line in body.splitlines()])

    def _result_line(self) -> str:
        post, polygons = self.run.output("postprocess"), self.run.output("polygons")
        line = f"foreground {float(post.mask.mean()):.4f}, {len(polygons)} polygon(s)"
        truth = self._source()[2]
        if truth is not None and np.shape(truth) == post.mask.shape:
            line += f", pixel IoU {pixel_scores(truth, post.mask).iou:.3f}"
        return line

    def __repr__(self) -> str:
        return self.summary()
