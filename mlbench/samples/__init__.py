"""Images to debug with: the bundled samples (with ground truth) and generated spheroids."""

from __future__ import annotations

from mlbench.samples.bundled import Sample, list_samples, load_sample, sample_index
from mlbench.samples.synthetic import make_spheroids

__all__ = ["Sample", "list_samples", "load_sample", "make_spheroids", "sample_index"]
