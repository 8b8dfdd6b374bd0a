"""Error blocks for :func:`mlbench.triage`: the text cut into messages, and the part of them the rules read.

A block is one Python traceback (to the end of its message) or one other message (a log record, or
an exception line with its continuation lines), after quote, pytest, rich-box and docker-compose
prefixes are stripped. The rules read at most :data:`BLOCK_CHARS` of one block (its first lines and
its last ones, where the exception message is) and at most :data:`CLASSIFY_CHARS` and
:data:`CLASSIFY_BLOCKS` of all (the first blocks and the last ones), so their work is bounded
whatever the log; :func:`within_budget` says which lines were left out.
"""

from __future__ import annotations

import re

from mlbench.failures.patterns import exception_name, is_frame, is_frame_header, strip_prefix

__all__ = ["BLOCK_CHARS", "CLASSIFY_CHARS", "CLASSIFY_BLOCKS", "TB_START", "cut_blocks", "fit_block", "within_budget"]

BLOCK_CHARS = 16 << 10
"""Characters of one error block the rules read: its first quarter and its last three quarters."""
CLASSIFY_CHARS, CLASSIFY_BLOCKS = 160 << 10, 4000
"""Characters and blocks of one input the rules read: the first blocks and the last ones."""
_LINE_CHARS = 4000
TB_START = re.compile(r"Traceback \(most recent call last\)")
_CHAIN = re.compile(r"^(During handling of the above exception|The above exception was the direct cause)")
_BARS = re.compile(r"^\s*(?:\d+\|[\w-]+\s*)?(?:[\d/-]{8,10}[ T][\d:.,]{8,15}\s+)?(?:[|+]\s?)+(?=\s*\S)")
_IPYTHON_CELL = re.compile(r"^\s*Cell In\s?\[\d*\], line \d+")
_LOG_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d|\[\d{4}-|\[?(INFO|ERROR|WARNING|WARN|DEBUG|CRITICAL)\b|[IWEF]\d{4} )")


def cut_blocks(lines: list[str]) -> list[tuple[int, list[str]]]:
    """Tracebacks as one block each (to the end of their message); other messages (a log record
    or an exception line with its continuation lines) as one block each. Lines are cut at 4000
    characters."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] | None = None
    in_traceback = seen_exception = gap = False
    for i, line in enumerate(lines):
        line = line[:_LINE_CHARS]
        line = _BARS.sub("", line) if "|" in line[:40] or "+" in line[:8] else line
        line = strip_prefix(line)
        stripped = line.strip()
        if TB_START.search(stripped):
            current, in_traceback, seen_exception, gap = [line], True, False, False
            blocks.append((i, current))
            continue
        if not stripped and in_traceback and not seen_exception and current is not None:
            current.append(line)  # kept, so that the block's lines keep their numbers
            gap = True  # IPython puts blank lines between frames and before the message
            continue
        if gap:
            gap = False
            if not (is_frame(line) or _IPYTHON_CELL.match(line) or exception_name(line)):
                current = None  # the traceback ended without its message
        if _CHAIN.match(stripped) or not stripped:
            current = None
            continue
        if not in_traceback and is_frame_header(line):  # a traceback pasted without its header
            current, in_traceback, seen_exception = [line], True, False
            blocks.append((i, current))
            continue
        is_exception = bool(exception_name(line))
        if current is not None and in_traceback and not (seen_exception and _LOG_PREFIX.match(line)):
            current.append(line)
            seen_exception = seen_exception or is_exception
            continue
        if current is None or in_traceback or is_exception or _LOG_PREFIX.match(line):
            current, in_traceback = [line], False
            blocks.append((i, current))
        else:
            current.append(line)
    return blocks


def fit_block(start: int, block: list[str]) -> tuple[list[str], list[int]]:
    """A block within :data:`BLOCK_CHARS`: its first lines (a quarter) and its last ones (where the
    exception message is), with the 1-based line number of each line kept."""
    numbers = list(range(start + 1, start + 1 + len(block)))
    if sum(len(line) + 1 for line in block) <= BLOCK_CHARS:
        return block, numbers
    head = _take(block, BLOCK_CHARS // 4)
    tail = len(block) - _take(block[::-1], BLOCK_CHARS - BLOCK_CHARS // 4)
    tail = max(tail, head)
    return block[:head] + block[tail:], numbers[:head] + numbers[tail:]


def _take(lines: list[str], chars: int) -> int:
    """How many of ``lines``, from the first, fit in ``chars`` characters (at least one)."""
    total = 0
    for count, line in enumerate(lines):
        total += len(line) + 1
        if total > chars:
            return max(count, 1)
    return len(lines)


def within_budget(blocks: list[tuple[list[str], list[int]]], origin: list[int]) -> tuple[list, str]:
    """The blocks the rules read: all when they fit in :data:`CLASSIFY_CHARS` and :data:`CLASSIFY_BLOCKS`,
    else the first ones (a quarter) and the last ones, and a note on those left out."""
    sizes = [sum(len(line) + 1 for line in block) for block, _ in blocks]
    if sum(sizes) <= CLASSIFY_CHARS and len(blocks) <= CLASSIFY_BLOCKS:
        return blocks, ""
    head = min(_take_sizes(sizes, CLASSIFY_CHARS // 4), CLASSIFY_BLOCKS // 4)
    tail = len(blocks) - min(_take_sizes(sizes[::-1], CLASSIFY_CHARS - CLASSIFY_CHARS // 4), CLASSIFY_BLOCKS - CLASSIFY_BLOCKS // 4)
    tail = max(head, tail)
    skipped = blocks[head:tail]
    if not skipped:
        return blocks, ""
    first, last = origin[skipped[0][1][0] - 1], origin[skipped[-1][1][-1] - 1]
    note = (f"{len(skipped):,} message(s) from line {first:,} to line {last:,} were not diagnosed: the rules read "
            f"at most {CLASSIFY_CHARS:,} characters and {CLASSIFY_BLOCKS:,} messages, the first and the last ones")
    return blocks[:head] + blocks[tail:], note


def _take_sizes(sizes: list[int], chars: int) -> int:
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if total > chars:
            return count
    return len(sizes)
