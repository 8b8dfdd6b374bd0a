"""The Stepper's controls, their layout and how its state is drawn (ipywidgets), and its busy state.

:class:`StepperPanel` is the half of :class:`~mlbench.widgets.Stepper` that touches ipywidgets:
it builds the controls, wires each one to a plain method of the Stepper, draws the stage strip,
the stage view, the pictures, the status line and the model card, disables every control
while a stage runs, and writes the text summary.
"""

from __future__ import annotations

import html
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from mlbench.metrics import pixel_scores
from mlbench.models.cards import card
from mlbench.pipeline.options import PRESET_NAMES
from mlbench.pipeline.stages import STAGE_NAMES
from mlbench.widgets.html import card_html, status_html, strip_html, view_html
from mlbench.widgets.images import DISPLAY_SIDE, DISPLAY_SIDES
from mlbench.widgets.views import pending_view

__all__ = ["StepperPanel"]


class StepperPanel:
    """Controls, layout, rendering and the busy state of the Stepper.

    The Stepper provides the state (``run``, ``error``, ``position``, ``stage``, ``view``,
    ``model``, ``notice``, ``choices``, ``image_choices``, ``_options``) and the actions the controls call (``next``, ``back``, ``run_all``,
    ``reset``, ``add_model``, ``open_image``, ``set_threshold``, ``_restart``, ``_add_uploads``).
    """

    _busy_depth = 0
    _quiet = False

    def _build_controls(self, models: list[str], model: str, images: list[str], image: str, preset: str,
                        threshold: float) -> None:
        import ipywidgets as w

        self.model_select = w.Dropdown(options=models, value=model, description="model")
        self.image_select = w.Dropdown(options=images, value=image, description="image")
        self.upload = w.FileUpload(accept="image/*,.tif,.tiff", multiple=False, description="upload")
        self.model_path = w.Text(placeholder="checkpoint path, e.g. weights/hrnet_best_model.pth", description="model path")
        self.image_path = w.Text(placeholder="image path, e.g. data/plate1.tif", description="image path")
        self.preset_toggle = w.ToggleButtons(options=list(PRESET_NAMES), value=preset, description="preset",
                                             style={"description_width": "initial", "button_width": "90px"})
        self.threshold_slider = w.FloatSlider(value=threshold, min=0.1, max=0.9, step=0.05, description="threshold",
                                              continuous_update=False, readout_format=".2f")
        self.size_toggle = w.ToggleButtons(options=DISPLAY_SIDES, value=DISPLAY_SIDE, description="size",
                                           style={"description_width": "initial", "button_width": "80px"})
        self.back_button, self.next_button = w.Button(description="Back", icon="arrow-left"), w.Button(description="Next", icon="arrow-right")
        self.run_all_button, self.reset_button = w.Button(description="Run all", icon="forward"), w.Button(description="Reset", icon="undo")
        self.add_model_button, self.open_image_button = w.Button(description="Add model", icon="plus"), w.Button(description="Open image", icon="folder-open")
        self.status, self.card_view = w.HTML(), w.HTML()
        self.strip, self.view_text = w.HTML(), w.HTML()
        self.images = w.HBox(layout=w.Layout(flex_flow="row wrap"))
        self.strip.add_class("mlbench-strip-widget")
        self._wire()
        self.widget = w.VBox([
            w.HBox([self.model_select, self.image_select, self.upload]),
            w.HBox([self.model_path, self.add_model_button, self.image_path, self.open_image_button]),
            w.HBox([self.preset_toggle, self.threshold_slider]),
            w.HBox([self.back_button, self.next_button, self.run_all_button, self.reset_button, self.size_toggle]),
            self.status, self.card_view, self.strip, self.view_text, self.images,
        ])
        self.widget.add_class("mlbench-stepper")

    def _wire(self) -> None:
        """Each control calls one plain method (observers stay silent while a dropdown's options are replaced)."""
        actions = ((self.back_button, self.back), (self.next_button, self.next), (self.run_all_button, self.run_all),
                   (self.reset_button, self.reset),
                   (self.add_model_button, lambda: self.add_model(self.model_path.value)),
                   (self.open_image_button, lambda: self.open_image(self.image_path.value)))
        for button, action in actions:
            button.add_class(f"mlbench-{button.description.lower().replace(' ', '-')}")
            button.on_click(lambda _button, act=action: act())
        for control in (self.model_select, self.image_select, self.preset_toggle):
            control.observe(lambda _change: self._quiet or self._restart(), names="value")
        self.threshold_slider.observe(lambda change: self.set_threshold(change["new"]), names="value")
        self.size_toggle.observe(lambda _change: self._redraw(), names="value")
        self.upload.observe(lambda change: self._add_uploads(change["new"]), names="value")

    @property
    def buttons(self) -> tuple:
        """Every button of the panel."""
        return (self.back_button, self.next_button, self.run_all_button, self.reset_button,
                self.add_model_button, self.open_image_button)

    def _controls(self) -> tuple:
        return self.buttons + (self.model_select, self.image_select, self.upload, self.model_path, self.image_path,
                               self.preset_toggle, self.threshold_slider, self.size_toggle)

    # ---- busy state ------------------------------------------------------------------
    @contextmanager
    def _busy(self, what: str) -> Iterator[None]:
        """Disable every control and say ``what`` runs; afterwards (also on an error) enable and redraw."""
        outer = self._busy_depth == 0
        if outer:
            self.notice = ""
            for control in self._controls():
                control.disabled = True
        self._busy_depth += 1
        self._say(what)
        try:
            yield
        finally:
            self._busy_depth -= 1
            if outer:
                for control in self._controls():
                    control.disabled = False
                self._render()

    def _say(self, what: str) -> None:
        """Show ``what`` is running in the status line (drawn at once: a forward pass takes seconds)."""
        self.status.value = status_html("busy", f"{what} ...")

    def _redraw(self) -> None:
        with self._busy("drawing"):
            pass

    def _set_choices(self, select: Any, names: list[str], value: str) -> None:
        """Replace a dropdown's options and select ``value``, with one restart (options alone select the first)."""
        self._quiet = True
        try:
            select.options = tuple(names)
            select.value = value
        finally:
            self._quiet = False
        self._restart()

    # ---- drawing ---------------------------------------------------------------------
    def _render(self) -> None:
        import ipywidgets as w

        self.status.value = status_html(*self._status())
        self.card_view.value = "" if self.model is None else card_html(card(self.model))
        if self.run is None:
            self.strip.value = ""
            self.view_text.value = f'<pre class="mlbench-error" style="color:#d55e00">{html.escape(self._error_line())}</pre>'
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

    def _status(self) -> tuple[str, str]:
        """``(kind, message)`` of the status line when nothing runs."""
        if self.notice:
            return "error", self.notice
        if self.run is None:
            return "error", self._error_line()
        failed = self.run.failed_stage
        if failed is not None:
            return "error", f"{failed} failed: {type(self.run.error).__name__}: {self.run.error}"
        if self.stage is None:
            return "ready", f"ready: {self.model_select.value} on {self.image_select.value}; press Next or Run all"
        return "ready", f"ready: {self.stage} done in {self.run.records[self.stage].seconds * 1000:.0f} ms"

    def _error_line(self) -> str:
        return f"{type(self.error).__name__}: {self.error}"

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = self.summary()
        return bundle

    # ---- text ------------------------------------------------------------------------
    def summary(self) -> str:
        """A stable text summary: controls, stage states and the report of the stage on view."""
        head = (f"Stepper(model={self.model_select.value}, image={self.image_select.value}, "
                f"preset={self.preset_toggle.value}, threshold={self.threshold_slider.value:.2f})")
        if self.run is None:
            return f"{head}\n  no run: {self._error_line()}"
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
        truth = self.image_choices.get(self.image_select.value)[2]
        if truth is not None and np.shape(truth) == post.mask.shape:
            line += f", pixel IoU {pixel_scores(truth, post.mask).iou:.3f}"
        return line

    def __repr__(self) -> str:
        return self.summary()
