"""Running the rule base of :func:`mlbench.triage` in linear time: literal pre-filters and proximity rules.

Every rule is a regular expression; run as is, the 600-odd of them cost about 20 microseconds per
byte of log, and a rule of the form ``A[^\\n]{0,200}?B[^\\n]{0,200}?C`` costs about 30,000 steps
per ``A`` on a line dense with ``A`` and ``B`` (each ``B`` in reach is tried with each of 200 gaps
to ``C``). This module keeps each rule's meaning and takes that cost away:

- **Literal pre-filter** (:func:`needed_literals`): from the parsed pattern, a set of strings one
  of which every match must contain (``"out of "`` for ``out of (GPU )?memory``, ``{"504",
  "gateway"}`` for the 504 rule). :meth:`RuleSet.candidates` finds each of the rule base's 850-odd
  literals with ``str.find`` once over all error blocks of an input (C speed), jumping to the next
  block after a hit, and a rule runs on a block only when one of its literals is there. This is
  exact: a rule is skipped only where it cannot match.
- **Proximity rules** (:class:`Rule`): a top-level alternative made of parts joined by lazy line
  gaps (``[^\\n]{0,N}?``) is matched part by part, each part once over the text, and the parts are
  chained with a binary search: part ``i + 1`` must start within ``N`` characters after part
  ``i`` ends, on the same line. Linear, and the same matches as the regular expression, with one
  difference: a part ends where it ends when matched alone (its longest match), where the regex
  could also backtrack into it. That matters only when the part's last characters could also start
  the next part (``cdn-lfs[\\w.-]{0,100}`` glued to ``timed out``: ``cdn-lfstimed out``);
  ``tests/test_triage.py`` checks the corpus and gap-edge strings give the regex's matches.
"""

from __future__ import annotations

import re
from bisect import bisect_left
from typing import Iterator

try:  # Python >= 3.11
    from re import _constants as _sre
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

__all__ = ["Rule", "RuleSet", "lower_ascii", "needed_literals", "split_gaps"]

_GAP = re.compile(r"\[\^\\n\]\{0,(\d+)\}\?")
_REPEATS = {op for op in (getattr(_sre, "MAX_REPEAT", None), getattr(_sre, "MIN_REPEAT", None),
                          getattr(_sre, "POSSESSIVE_REPEAT", None)) if op is not None}


def lower_ascii(text: str) -> str:
    """``text`` with A-Z lower-cased and nothing else changed (``str.lower`` also folds the Kelvin
    sign into ``k``, which a case-insensitive ASCII regex does not)."""
    if text.isascii():
        return text.lower()
    return text.encode("utf-8", "surrogatepass").lower().decode("utf-8", "surrogatepass")


# ---- literal pre-filter ---------------------------------------------------------------------
def needed_literals(pattern: str, flags: int = 0) -> tuple[str, ...] | None:
    """Lower-case strings one of which every match of ``pattern`` contains, or None when there is no such set.

    Examples
    --------
    >>> needed_literals(r"out of (shared )?memory|OOM when", re.I | re.ASCII)
    ('oom when', 'out of ')
    >>> needed_literals(r"\\d+ bytes?")
    (' byte',)
    """
    try:
        parsed = _sre_parse.parse(pattern, flags)
    except Exception:  # an internal parser that changed: no pre-filter, the rule always runs
        return None
    flags = getattr(parsed, "state", getattr(parsed, "pattern", None)).flags
    if flags & re.IGNORECASE and not flags & re.ASCII:
        return None  # Unicode case folding maps non-ASCII letters onto k, s and i
    found = _needs(list(parsed))
    return tuple(sorted(found)) if found else None


def _rank(literals: frozenset[str]) -> tuple[int, int]:
    return min(len(s) for s in literals), -len(literals)


def _char(op, av) -> str | None:
    """The lower-case ASCII character an item matches alone (a literal, or a class of one letter's cases)."""
    if op is _sre.LITERAL and av < 128:
        return chr(av).lower()
    if op is _sre.IN and av and all(kind is _sre.LITERAL and code < 128 for kind, code in av):
        letters = {chr(code).lower() for _, code in av}
        return letters.pop() if len(letters) == 1 else None
    return None


def _needs(items: list) -> frozenset[str] | None:
    """The best set of literals one of which every match of this sequence of parsed items contains."""
    best: frozenset[str] | None = None
    run: list[str] = []

    def take(found: frozenset[str] | None) -> None:
        nonlocal best
        if found and (best is None or _rank(found) > _rank(best)):
            best = found

    for op, av in items:
        char = _char(op, av)
        if char is not None:
            run.append(char)
            continue
        if op is _sre.AT:  # an anchor takes no character: the run goes on
            continue
        take(frozenset({"".join(run)}) if run else None)
        run = []
        if op is _sre.SUBPATTERN:
            take(_needs(list(av[-1])))
        elif op is getattr(_sre, "ATOMIC_GROUP", None):
            take(_needs(list(av)))
        elif op is _sre.BRANCH:
            found = [_needs(list(branch)) for branch in av[1]]
            take(None if any(f is None for f in found) else frozenset().union(*found))
        elif op in _REPEATS and av[0] >= 1:
            take(_needs(list(av[2])))
    take(frozenset({"".join(run)}) if run else None)
    return best


# ---- proximity rules -------------------------------------------------------------------------
def split_gaps(pattern: str) -> list[list[tuple[str, int]]]:
    """The top-level alternatives of ``pattern``, each as ``[(part, gap after it), ...]``.

    A gap is a lazy ``[^\\n]{0,N}?`` outside any group or class; the last part's gap is 0.

    Examples
    --------
    >>> split_gaps(r"(a|b)[^\\n]{0,200}?c|d")
    [[('(a|b)', 200), ('c', 0)], [('d', 0)]]
    """
    alternatives: list[list[tuple[str, int]]] = [[]]
    depth, start, i, in_class = 0, 0, 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            gap = _GAP.match(pattern, i) if depth == 0 else None
            if gap:
                alternatives[-1].append((pattern[start:i], int(gap.group(1))))
                start = i = gap.end()
                continue
            i += 2 if pattern.startswith("[^", i) else 1
            i += 1 if pattern.startswith("]", i) else 0  # a ] first in a class is a literal
            in_class = True
            continue
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            alternatives[-1].append((pattern[start:i], 0))
            alternatives.append([])
            start = i + 1
        i += 1
    alternatives[-1].append((pattern[start:], 0))
    return alternatives


class _Match:
    """What the classifier reads of a match: where it starts and ends."""

    __slots__ = ("_start", "_end")

    def __init__(self, start: int, end: int) -> None:
        self._start, self._end = start, end

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end


class Rule:
    """One weighted rule, compiled for speed, with the same matches as ``re.compile(pattern, flags)``.

    Attributes
    ----------
    failure_class, weight, weak : what a match means (see :mod:`mlbench.failures.rules`).
    regex : the whole pattern, compiled.
    needs : literals one of which a match contains (None: no pre-filter).
    """

    def __init__(self, failure_class: str, weight: float, pattern: str, flags: int, weak: bool = False) -> None:
        self.failure_class, self.weight, self.weak = failure_class, float(weight), weak
        self.pattern, self.regex = pattern, re.compile(pattern, flags)
        self.needs = needed_literals(pattern, flags)
        alternatives = split_gaps(pattern)
        self._chains = None
        if any(len(parts) > 1 for parts in alternatives):
            self._chains = [[(re.compile(f"(?=({part}))", flags), gap) for part, gap in parts] for parts in alternatives]

    def finditer(self, text: str) -> Iterator:
        """Non-overlapping matches, left to right, as ``regex.finditer`` gives them."""
        if self._chains is None:
            return self.regex.finditer(text)
        return self._chained(text)

    def _chained(self, text: str) -> Iterator[_Match]:
        found = sorted((start, order, end) for order, chain in enumerate(self._chains)
                       for start, end in _chain_matches(chain, text))
        position = 0
        for start, _, end in found:  # at one place the first alternative that matches wins, as in a regex
            if start >= position:
                yield _Match(start, end)
                position = end if end > start else start + 1


def _part_matches(rx: re.Pattern, text: str) -> tuple[list[int], list[int]]:
    """Every position where a part matches (overlapping) and the end of the match there."""
    starts, ends = [], []
    for match in rx.finditer(text):
        starts.append(match.start())
        ends.append(match.end(1))
    return starts, ends


def _chain_matches(chain: list[tuple[re.Pattern, int]], text: str) -> list[tuple[int, int]]:
    """(start, end) of each match of ``part0 gap part1 gap ...``: part ``i + 1`` at the first place it
    matches at most ``gap`` characters after part ``i`` ends, no newline between (the lazy gap)."""
    starts, ends = _part_matches(chain[-1][0], text)
    reach = ends  # for each start of the current part, the end of the whole chain from there
    for rx, gap in reversed(chain[:-1]):
        part_starts, part_ends = _part_matches(rx, text)
        new_starts, new_reach = [], []
        for start, end in zip(part_starts, part_ends):
            k = bisect_left(starts, end)
            if k < len(starts) and starts[k] - end <= gap and text.find("\n", end, starts[k]) < 0:
                new_starts.append(start)
                new_reach.append(reach[k])
        starts, reach = new_starts, new_reach
    return list(zip(starts, reach))


class RuleSet:
    """Rules and, per literal, the rules that need it: which rules can match in which block."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self._always = {i for i, rule in enumerate(rules) if rule.needs is None}
        self._index: dict[str, list[int]] = {}
        for i, rule in enumerate(rules):
            for literal in rule.needs or ():
                self._index.setdefault(literal, []).append(i)

    def candidates(self, texts: list[str]) -> list[list[Rule]]:
        """For each text (an error block), the rules that may match it, in rule order.

        Each literal is searched once over all texts joined (``str.find`` on the ASCII lower-cased
        text); after a hit the search goes on from the end of that text, so the work is one pass
        per literal plus one step per (literal, text holding it).
        """
        low = lower_ascii("\n".join(texts))
        starts, ends, position = [], [], 0
        for text in texts:
            starts.append(position)
            position += len(text)
            ends.append(position)
            position += 1
        present: list[set[int]] = [set(self._always) for _ in texts]
        for literal, ids in self._index.items():
            at = low.find(literal)
            while at >= 0:
                block = bisect_left(starts, at + 1) - 1
                present[block].update(ids)
                at = low.find(literal, ends[block] + 1)
        return [[self.rules[i] for i in sorted(ids)] for ids in present]
