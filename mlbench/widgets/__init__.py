"""Widgets for notebooks: ``mb.widgets.Stepper`` walks one image through the pipeline.

Importing this package does not import ipywidgets or matplotlib; the widgets import them
when they are built. The stage views (:mod:`mlbench.widgets.views`) are pure functions.
"""

from __future__ import annotations

from mlbench.widgets.stepper import Stepper
from mlbench.widgets.views import StageView, ViewImage, stage_view

__all__ = ["Stepper", "StageView", "ViewImage", "stage_view"]
