"""``mb.triage``: what kind of failure is this? From an exception or any pasted error text.

The input is cut into error blocks (each Python traceback, each other log line), after
stripping quote, pytest, rich-box and docker-compose prefixes; each block is scored against
the weighted rules of :mod:`mlbench.failures.rules` and :mod:`mlbench.failures.library_rules` (the
exception message counts most, stack frames least, weak hints only on lines that read as errors)
and the context rules of :mod:`mlbench.failures.patterns` (tensor types, what a missing file is,
the call and the library that raised);
the best class per block becomes a :class:`Diagnosis` with the deciding line as evidence and
the numbers pulled from the text. Several errors give several diagnoses, root cause first.

Budget: linear in the input and bounded: a C-speed keyword search over the log (about 0.05 s per
MB) plus rule matching on at most 160 KiB of it (under a second); under 2 s per 10 MB
on a 2-core machine, whatever the log holds (``bench/triage_speed.py`` measures it). How (see
:mod:`mlbench.failures.stream` for the reading):

- at most ``max_triage_bytes`` (64 MiB) of an input are searched, its head and its tail, with a
  note in :attr:`Diagnosis.input_note`; above 64 KiB only the error-like lines and whole
  tracebacks are kept;
- each block gives the rules at most 16 KiB (its first quarter and its last three quarters, where
  the exception message is), and all blocks together at most 160 KiB and 4000 blocks (the first
  blocks and the last ones; the note says which lines were left out), every line cut at 4000
  characters (:mod:`mlbench.failures.blocks`);
- a rule runs on a block only when the block holds a literal every match of the rule contains, and
  rules with line gaps are matched part by part (:mod:`mlbench.failures.matching`); no regular
  expression used here backtracks more than a bounded amount per character (``tests/test_triage.py``
  checks the pathological inputs).
"""

from __future__ import annotations

import os
import re
from bisect import bisect_right
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any, Union

from mlbench.failures import numbers as triage_numbers
from mlbench.failures.case_index import similar_cases
from mlbench.failures.causes import cause_meaning, find_cause
from mlbench.errors import OptionsError
from mlbench.failures.blocks import TB_START, cut_blocks, fit_block, within_budget
from mlbench.failures.library_rules import LIBRARY_RULES, whole_input_diagnoses
from mlbench.failures.log_formats import normalize
from mlbench.failures.matching import Rule, RuleSet
from mlbench.failures.patterns import caused_by_earlier, context_scores, exception_name, ipython_header_name, is_frame, is_frame_header
from mlbench.failures.rules import CLASS_INFO, CONSEQUENCE_CLASSES, RULES, WEAK_RULES
from mlbench.failures.stream import Reading, read_source
from mlbench.findings import ReportText

__all__ = ["Diagnosis", "triage", "triage_text", "triage_text_all", "make_diagnosis", "FAILURE_CLASSES", "add_triage_command"]

FAILURE_CLASSES = tuple(CLASS_INFO)
_FLAGS = re.I | re.M | re.ASCII
_RULES = RuleSet([Rule(cls, w, p, _FLAGS) for cls, w, p in RULES + LIBRARY_RULES]
                 + [Rule(cls, w, p, _FLAGS, weak=True) for cls, w, p in WEAK_RULES])
# A weak hint counts only on a line that reads as an error, not on progress or config lines.
_ERRORISH = re.compile(r"error|exception|fail|fatal|critical|warn|cannot|can't|could not|unable|invalid|not found|denied|refused"
                       r"|killed|abort|traceback|timed out|\bnan\b|wrong|mismatch|missing|unexpected|expected|assert|problem|issue", re.I)

@dataclass(frozen=True, repr=False)
class Diagnosis(ReportText):
    """One diagnosed failure. The text repr is the report.

    Attributes
    ----------
    failure_class : one of :data:`FAILURE_CLASSES` (DESIGN.md section 4).
    evidence : the input line that decided it ("" for unknown).
    explanation : what happened, in plain words, with the numbers found.
    fix : what to do: for the cause the text names where one is known (``numbers["cause"]``,
        :mod:`mlbench.failures.causes`), else for the class.
    notebook : the notebook that walks through this failure class.
    numbers : values pulled from the text (bytes, keys, sizes, module names, ...) and the named
        ``cause`` (e.g. ``"nothing_listening"`` for a refused connection).
    confidence : the winning rule's weight, 0..~7.5.
    line : 1-based line of the evidence in the input (0 when unknown).
    count : how many times this same error occurred in the input.
    exception_type : the exception's type name when one was seen.
    others : further diagnoses from the same input, most likely root cause first.
    similar_cases : past cases from the casebook (name, class, evidence, fix), most similar first.
    input_note : what part of the input was not searched (over the ``max_triage_bytes`` budget, or
        error blocks past the rules' budget), and how to search it all; "" when all of it was.
    """

    failure_class: str
    evidence: str
    explanation: str
    fix: str
    notebook: str
    numbers: dict = field(default_factory=dict)
    confidence: float = 0.0
    line: int = 0
    count: int = 1
    exception_type: str = ""
    others: tuple = ()
    similar_cases: tuple = ()
    input_note: str = ""

    @property
    def all(self) -> tuple["Diagnosis", ...]:
        """This diagnosis followed by the others, root cause first."""
        return (replace(self, others=()),) + tuple(self.others)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (``others`` as a list of dicts)."""
        out = asdict(replace(self, others=()))
        out["others"] = [d.to_dict() for d in self.others]
        out["similar_cases"] = [dict(c) for c in self.similar_cases]
        return out

    def _summary(self) -> str:
        where = f" (line {self.line}{f', x{self.count}' if self.count > 1 else ''})" if self.line else ""
        lines = [f"{self.failure_class}{where}: {self.explanation}"]
        if self.evidence:
            lines.append(f"  evidence: {self.evidence}")
        lines += [f"  fix: {self.fix}", f"  notebook: notebooks/{self.notebook}"]
        return "\n".join(lines)

    def text(self) -> str:
        text = [self._summary()]
        if self.others:
            text.append(f"{len(self.others)} more error(s) in the same input:")
            text += ["- " + d._summary().replace("\n", "\n  ") for d in self.others]
        for case in self.similar_cases:
            text.append(f"similar past case: {case['name']} ({case['failure_class']}): fix was {case['fix']}")
        if self.input_note:
            text.append(f"note: {self.input_note}")
        return "\n".join(text)


TriageInput = Union[BaseException, str, bytes, os.PathLike, IO]


def triage(source: TriageInput, *, casebook: Any = None, k: int = 3) -> Diagnosis:
    """Diagnose an exception, an error text, a log file or a stream.

    Parameters
    ----------
    source : BaseException, str, bytes, path or file object
        An exception (its chained causes and frames are used), pasted text (traceback,
        service log, HTTP error body), a :class:`pathlib.Path` of a log file, or an open
        text/binary stream. A plain ``str`` is always treated as text, never as a path. At most
        ``max_triage_bytes`` (:class:`mlbench.budgets.Budgets`) are searched: the head and the
        tail, with a note in ``input_note``.
    casebook : path, Casebook, False or None
        Where to look for similar past cases; None uses the default casebook folders
        (``data/cases`` and ``$MLBENCH_CASEBOOK``), False skips the search.
    k : int
        How many similar cases to return at most.

    Returns
    -------
    Diagnosis
        The most likely root cause; ``.others`` holds further errors found in the input.

    Examples
    --------
    >>> d = triage("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total "
    ...            "capacity)", casebook=False)
    >>> d.failure_class, d.notebook, d.numbers["requested_bytes"]
    ('cuda_oom', '01_out_of_memory.ipynb', 2147483648)
    """
    diagnoses = triage_text_all(source)
    first = replace(diagnoses[0], others=tuple(diagnoses[1:]))
    if casebook is not False and first.failure_class != "unknown":
        first = replace(first, similar_cases=tuple(similar_cases(first, casebook, k)))
    return first


def triage_text(text: str) -> Diagnosis:
    """Shortcut for :func:`triage` on text, without the casebook search."""
    return triage(text, casebook=False)


def triage_text_all(source: TriageInput) -> list[Diagnosis]:
    """Every diagnosis in ``source``, root cause first (``[unknown]`` when nothing is recognised)."""
    reading = read_source(source)
    text = reading.text
    if _binary(text):
        return [_unknown(text, reading)]
    text, origin = normalize(text)  # ANSI colours, JSON log records, flattened tracebacks
    origin = [reading.numbers[n - 1] for n in origin] if reading.numbers else origin
    blocks, left_out = within_budget([fit_block(start, block) for start, block in cut_blocks(text.split("\n"))], origin)
    note = "; ".join(filter(None, (reading.note, left_out)))
    found = []
    texts = ["\n".join(block) for block, _ in blocks]
    for (block, numbers), block_text, rules in zip(blocks, texts, _RULES.candidates(texts)):
        diagnosis = _classify(block, numbers, block_text, rules)
        if diagnosis is not None:
            found.append(replace(diagnosis, line=origin[diagnosis.line - 1]))
    found = _merge(found) or [replace(d, line=origin[d.line - 1]) for d in whole_input_diagnoses(text, _make)]
    if not found:
        return [_unknown(text, replace(reading, note=note))]
    return [replace(d, input_note=note) for d in _root_cause_first(found)] if note else _root_cause_first(found)


def _root_cause_first(found: list[Diagnosis]) -> list[Diagnosis]:
    """Strong diagnoses before weak hints; among strong ones an error caused by an earlier one (a worker
    killed after its timeout) and the usual consequences (timeouts, overload) last, else input order;
    weak hints by confidence."""
    caused = [caused_by_earlier(d.failure_class, d.evidence, [(e.failure_class, e.evidence) for e in found[:i]])
              for i, d in enumerate(found)]
    weak = [d.confidence < 4.5 for d in found]
    quiet = [_quiet(d.evidence) for d in found]  # a pasted code line with no error in it
    later = CONSEQUENCE_CLASSES | {"unknown"}
    order = sorted(range(len(found)), key=lambda i: (weak[i], caused[i], quiet[i], not weak[i] and found[i].failure_class in later,
                                                     -found[i].confidence if weak[i] else 0.0, i))
    return [found[i] for i in order]


def _quiet(evidence: str) -> bool:
    """A line of code (an assignment or a call) that says nothing of an error: the user's source, not the failure."""
    return bool(re.search(r"=|\w\(", evidence)) and not _ERRORISH.search(evidence) and not exception_name(evidence)


def make_diagnosis(failure_class: str, evidence: str = "") -> Diagnosis:
    """A diagnosis of a known class (e.g. filed by hand for a silent failure); "none" for a good run.

    Raises
    ------
    OptionsError
        For a class outside :data:`FAILURE_CLASSES` and "none".
    """
    if failure_class == "none":
        return Diagnosis("none", evidence, "no failure: the run completed", "nothing to fix", "00_tour.ipynb")
    if failure_class not in CLASS_INFO:
        raise OptionsError(f"failure_class={failure_class!r} is unknown; expected one of {FAILURE_CLASSES} or 'none'")
    return _make(failure_class, evidence, evidence, 0.0, 0, "")


# ---- blocks and classification ------------------------------------------------------------
_LOG_LEVEL = r"^\W{0,3}(?:\d{4}-\d\d-\d\d[\d:,.T ]{0,16}\W{0,3})?(?:\w{1,20}_)?"
_INFO_LINE = re.compile(_LOG_LEVEL + r"(?:INFO|DEBUG|TRACE)\b")
_ERROR_LINE = re.compile(_LOG_LEVEL + r"(?:ERROR|CRITICAL|FATAL)\b")
_SETTINGS_LINE = re.compile(r"^\s*\{'\w+': ")  # a printed Python dict of options ({'normalize': True, ...})


def _line_factor(line: str, previous: str, has_message: bool) -> float:
    """How much a match on ``line`` counts: the exception line most, stack frames least (but more
    when the traceback was cut before its message, so the frames are all there is)."""
    if exception_name(line) or _ERROR_LINE.match(line):
        return 1.25
    if _INFO_LINE.match(line) or _SETTINGS_LINE.match(line):
        return 0.4  # a log line at INFO or DEBUG level reports progress, a printed dict of options settings
    if is_frame(line):
        return 0.3 if has_message else 0.6
    if previous and is_frame_header(previous):
        return 0.35 if has_message else 0.6  # the source line under a frame
    return 1.0


def _classify(block: list[str], numbers: list[int], text: str, rules: list[Rule]) -> Diagnosis | None:
    """The best-scoring class of one error block, or None. ``numbers`` are its lines' 1-based numbers,
    ``text`` the lines joined, ``rules`` those that may match it (:meth:`RuleSet.candidates`)."""
    starts = [0]
    for line in block[:-1]:
        starts.append(starts[-1] + len(line) + 1)
    best: dict[str, tuple[float, int, int]] = {}  # class -> (score, line index, hits)
    in_traceback = any(TB_START.search(line) or is_frame_header(line) for line in block[:60])
    has_message = any(exception_name(line) for line in block)
    says_what = has_message and _message_says_what(block)
    for rule in rules:
        for n, match in enumerate(rule.finditer(text)):
            if n == 4:
                break
            idx = bisect_right(starts, match.start()) - 1
            if rule.weak and not in_traceback and not _ERRORISH.search(block[idx]):
                continue
            if rule.weak and says_what and _code_line(block[idx], block[idx - 1] if idx else ""):
                continue  # a hint word in a path, a frame or its source line, where the message says what failed
            score = rule.weight * _line_factor(block[idx], block[idx - 1] if idx else "", has_message)
            old = best.get(rule.failure_class, (0.0, 0, 0))
            best[rule.failure_class] = (max(old[0], score), idx if score > old[0] else old[1], old[2] + 1)
    exc_type = _exception_type(block)
    for cls, score in context_scores(text, exc_type):
        old = best.get(cls, (0.0, _exc_index(block), 0))
        best[cls] = (max(old[0], score), old[1] if old[0] >= score else _exc_index(block), old[2] + 1)
    if not best:
        return None
    cls, (score, idx, hits) = max(best.items(), key=lambda kv: (kv[1][0] + 0.05 * min(kv[1][2], 6), -kv[1][1]))
    return _make(cls, block[idx].strip()[:400], text, score, numbers[idx], exc_type)


def _message_says_what(block: list[str]) -> bool:
    """Whether the block's last exception line has words after its type (``ValueError: all the input
    arrays ...``, not a bare ``ValueError`` or ``SystemExit: 1``)."""
    line = next((line for line in reversed(block) if exception_name(line)), "")
    message = line.strip()[len(exception_name(line.strip())):]
    return len(re.findall(r"[A-Za-z]{2,}", message)) >= 2


def _code_line(line: str, previous: str) -> bool:
    """A stack frame, or the source line printed under a frame header (not an exception line that
    follows a frame directly, as in a REPL or compiled code)."""
    return is_frame(line) or (bool(previous) and is_frame_header(previous) and not exception_name(line.strip()))


def _exception_type(block: list[str]) -> str:
    for line in reversed(block):
        name = exception_name(line)
        if name:
            return name.rsplit(".", 1)[-1]
    header = next((name for name in map(ipython_header_name, block[:3]) if name), "")  # IPython, cut before the message
    return header.rsplit(".", 1)[-1]


def _exc_index(block: list[str]) -> int:
    return next((i for i in range(len(block) - 1, -1, -1) if exception_name(block[i])), len(block) - 1)


def _make(cls: str, evidence: str, text: str, score: float, line: int, exc_type: str) -> Diagnosis:
    title, meaning, fix, notebook = CLASS_INFO[cls]
    numbers = triage_numbers.extract(cls, text)
    detail = triage_numbers.describe(cls, numbers)
    cause = find_cause(cls, text)
    if cause is not None:  # the cause's own account replaces the class's most common one
        numbers = {**numbers, "cause": cause[0]}
        meaning = cause_meaning(cause[1])
    explanation = f"{title}: {meaning}" + (f"; {detail}" if detail else "")
    fix = triage_numbers.specific_fix(cls, numbers) or (cause[1] if cause else fix)
    return Diagnosis(cls, evidence, explanation, fix, notebook, numbers, round(score, 2), line, 1, exc_type)


def _merge(found: list[Diagnosis]) -> list[Diagnosis]:
    """Adjacent diagnoses of one class become one; repeats of the same evidence are counted."""
    merged: list[Diagnosis] = []
    index: dict[tuple[str, str], int] = {}
    for diagnosis in found:
        key = (diagnosis.failure_class, re.sub(r"\d+", "#", diagnosis.evidence))
        if key in index:
            i = index[key]
            merged[i] = replace(merged[i], count=merged[i].count + 1)
        elif merged and merged[-1].failure_class == diagnosis.failure_class and diagnosis.line - merged[-1].line <= 3:
            keep = max(merged[-1], diagnosis, key=lambda d: d.confidence)
            numbers = {**diagnosis.numbers, **merged[-1].numbers}
            fix = triage_numbers.specific_fix(keep.failure_class, numbers) or keep.fix  # the merged numbers may name more
            merged[-1] = replace(keep, numbers=numbers, fix=fix, count=merged[-1].count)
        else:
            index[key] = len(merged)
            merged.append(diagnosis)
    return merged


def _binary(text: str) -> bool:
    """More than 10% of the first 4096 characters are undecodable or control characters."""
    head = text[:4096]
    return bool(head) and sum(ch == "\ufffd" or (ord(ch) < 32 and ch not in "\n\t") for ch in head) > 0.1 * len(head)


def _unknown(text: str, reading: Reading) -> Diagnosis:
    title, meaning, fix, notebook = CLASS_INFO["unknown"]
    note = reading.summary
    if not text.strip():
        reason = "the input is empty"
    elif _binary(text):
        reason = f"the input looks binary, not text ({len(text)} characters decoded)"
    else:
        first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")[:120]
        reason = f"no known error pattern in {len(text.splitlines())} line(s) ({note}); first line: {first!r}"
        server = _SERVER_ERROR.search(text)
        if server:
            status = server.group("code") or server.group("code2") or "500"
            reason = (f"the server answered {status}: the error happened inside the server, so its cause is in the "
                      f"server's log or the response body, not in this text; {reason}")
            fix = (f"find the server's log lines at the time of this request (its request id, if the answer had one) "
                   f"and triage them (`mlbench triage server.log`), or print the response body "
                   f"(`response.text`); then {fix}")
    return Diagnosis("unknown", "", f"{meaning}: {reason}", fix, notebook, {"reason": reason}, 0.0, 0, 1, "",
                     input_note=reading.note)


# A 5xx answer that no other rule explains: an error inside the server, whose text is not here.
_SERVER_ERROR = re.compile(r"\b(?P<code>50[0-9])\b\W{0,3}(?:Server Error|Internal Server Error|Internal Error)"
                           r"|HTTP Error (?P<code2>50[0-9])\b|Internal Server Error", re.IGNORECASE)


# ---- command line -------------------------------------------------------------------------
def add_triage_command(sub) -> None:
    """Register ``mlbench triage FILE|- [--json]`` on an argparse sub-parsers object."""
    p = sub.add_parser("triage", help="diagnose an error text, traceback or log: what kind of failure is this?")
    p.add_argument("file", help="log or traceback file, or - for standard input")
    p.add_argument("--json", action="store_true", help="print the diagnoses as JSON")
    p.set_defaults(run=_triage_cli)


def _triage_cli(args) -> int:
    import json
    import sys
    from pathlib import Path

    source = sys.stdin.buffer if args.file == "-" else Path(args.file)
    diagnosis = triage(source)
    print(json.dumps(diagnosis.to_dict(), indent=1) if args.json else repr(diagnosis))
    return 0 if diagnosis.failure_class == "unknown" else 1
