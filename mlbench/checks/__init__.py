"""Inspectors that report findings without raising on bad input: images, weights, input
normalisation, the image's domain, polygons and the environment. Each returns a report whose text is the report."""

from __future__ import annotations

from mlbench.checks.domain import DomainReport, check_domain
from mlbench.checks.environment import EnvReport, doctor
from mlbench.checks.image import check_image
from mlbench.checks.normalization import NormReport, check_normalization
from mlbench.checks.polygons import PolygonReport, check_polygons, rasterize_polygons, threshold_counts
from mlbench.checks.weights import WeightsReport, check_weights, read_checkpoint

__all__ = ["DomainReport", "EnvReport", "NormReport", "PolygonReport", "WeightsReport", "check_domain", "check_image", "check_normalization", "check_polygons", "check_weights", "doctor", "rasterize_polygons", "read_checkpoint", "threshold_counts"]
