"""``mlbench memory``: predicted peak memory of a model per input side, and the largest side per budget.

The lead registers it in ``mlbench/cli.py`` with ``add_memory_command`` (the ``@command`` pattern).
"""

from __future__ import annotations

import argparse
import json

import torch

_GIB = 1024**3


def add_memory_command(sub) -> None:
    """Add ``memory [MODEL] [--size full] [--sides ...] [--budgets-gib ...] [--device cuda] [--json]``
    (``mlbench`` adds ``--weights PATH`` and ``--card JSON``: a checkpoint is estimated at its own widths)."""
    p = sub.add_parser("memory", help="predict a forward pass's peak memory (nothing allocated) and the largest safe side")
    p.add_argument("model", nargs="?", default=None,
                   help="hrnet | cbam_resunet | ma_resunet (or a service id); with --weights, the architecture the "
                        "checkpoint must be (optional)")
    p.add_argument("--size", default="full", choices=["small", "full"], help="model widths of a MODEL (default: full)")
    p.add_argument("--sides", type=int, nargs="+", default=[1024, 2048], help="square input sides to estimate")
    p.add_argument("--budgets-gib", type=float, nargs="*", default=[8, 24, 80], help="GPU sizes for the largest side")
    p.add_argument("--device", default="cuda", help="cuda rounds tensors like the CUDA allocator; cpu does not")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=_memory)


def _memory(args: argparse.Namespace) -> int:
    from mlbench.findings import format_bytes
    from mlbench.models import build_model
    from mlbench.models.cards import card
    from mlbench.probes.estimate import estimate_memory, max_input_size

    model = args.model if isinstance(args.model, torch.nn.Module) else build_model(args.model, args.size, device="meta")
    dtype, channels = getattr(torch, args.dtype), card(model).channels
    estimates = [estimate_memory(model, (channels, side, side), dtype=dtype, device=args.device) for side in args.sides]
    largest = {f"{gib:g} GiB": max_input_size(model, int(gib * _GIB), dtype=dtype, device=args.device, channels=channels)
               for gib in args.budgets_gib}
    if args.json:
        print(json.dumps({"estimates": [e.to_dict() for e in estimates], "largest_side": largest}, indent=1))
        return 0
    for estimate in estimates:
        print(estimate)
    for budget, side in largest.items():
        print(f"largest square side within {budget}: {side} "
              f"(multiple of {getattr(model, 'input_multiple', 1)}; {format_bytes(budget_bytes(budget))} budget)")
    return 0


def budget_bytes(label: str) -> int:
    """``'24 GiB'`` -> bytes."""
    return int(float(label.split()[0]) * _GIB)
