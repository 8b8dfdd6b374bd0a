"""Looking inside the forward pass: shape traces, memory timelines and memory prediction.

>>> trace = mb.trace_shapes(model, x); trace.explain()          # doctest: +SKIP
>>> with mb.record_memory(model) as timeline: model(x)           # doctest: +SKIP
>>> mb.estimate_memory(model, 2048); mb.max_input_size(model, 8 * 1024**3)   # doctest: +SKIP
"""

from mlbench.probes.estimate import MemoryEstimate, estimate_memory, max_input_size
from mlbench.failures.forward_errors import Explanation, explain_error, explain_output_size, size_chain, valid_sides
from mlbench.probes.memory import MemoryPeak, MemoryTimeline, limit_memory, note, record_memory
from mlbench.probes.shapes import ModuleCall, ShapeTrace, trace_shapes

__all__ = [
    "Explanation", "MemoryEstimate", "MemoryPeak", "MemoryTimeline", "ModuleCall", "ShapeTrace",
    "estimate_memory", "explain_error", "explain_output_size", "limit_memory", "max_input_size", "note",
    "record_memory", "size_chain", "trace_shapes", "valid_sides",
]
