"""Context rules of :func:`mlbench.triage`: what a single regex cannot see.

The weighted patterns of :mod:`mlbench.failures.rules` read one message at a time. The rules
here look at the shape of an error block instead: which lines are stack frames (Python,
IPython, rich, Java), which prefixes a log or a quote adds to a line (``> ``, pytest's
``E   ``, rich's ``│``, docker compose's ``svc_1  | ``), the tensor types named in a
message (device or dtype?), what a missing file is (weights or an image?) and which of
two errors in one log caused the other (a worker killed after its timeout).
"""

from __future__ import annotations

import re

from mlbench.failures.library_rules import library_context_scores

__all__ = ["strip_prefix", "is_frame", "is_frame_header", "context_scores", "type_class", "caused_by_earlier"]

_FLAGS = re.I | re.M | re.ASCII
# Line prefixes that carry no meaning: quotes, pytest, rich boxes, docker compose, code fences.
_PREFIX = re.compile(r"^(?:\s*(?:>\s?)+|E {2,}|\s*[│┃|]\s?(?=.*[│┃]\s*$)|[\w.-]{1,40}\s+\|\s(?=\S)|\s*`{1,3}(?=\S))")
_FRAME = re.compile(
    r'^\s*File "[^"\n]{0,500}", line \d+'               # CPython
    r"|^\s*File [^\n]{1,500}:\d+,? in \S"                # IPython 8 / rich
    r"|^\s*\S{0,300}\.pyx?(?::\d+)? in \S"               # IPython 7: path.py in func(...)
    r"|^\s*<ipython-input-[\w-]+> in "                  # IPython cell frame
    r"|^\s*-*>\s*\d+\s"                                  # IPython arrow line: ----> 5 code
    r"|^\s+\d{1,5} {1,}\S"                               # IPython listing line:     25   code
    r"|^\s*(?:❱\s*)?\d{1,5} │"                          # rich listing line
    r"|^\s*at [\w.$<>]+\("                               # Java / JS
    r"|^\s*#\d+ |^\s*frame #\d+:"                        # C / c10 backtrace
    r"|^\s*\[<[0-9a-f]+>\]",                             # kernel call trace
    _FLAGS)
_CARETS = re.compile(r"^\s*[\^~]+\s*$")
# The first line of a frame: where a traceback (or a piece of one) starts.
_FRAME_HEADER = re.compile(r'^\s*File "[^"\n]{0,500}", line \d+|^\s*File [^\n]{1,500}:\d+,? in \S|^\s*\S{0,300}\.pyx?(?::\d+)? in \S'
                           r"|^\s*<ipython-input-[\w-]+> in |^\s*-{2,}>\s?\d{1,5}\s", _FLAGS)

# Exception types that name their class by a prefix (NVMLError_DriverNotLoaded, ...).
_TYPE_PREFIXES = (("NVMLError", "device_mismatch"), ("CudaError", "device_mismatch"), ("NCCLError", "device_mismatch"))
_TYPES = {
    "OutOfMemoryError": "cuda_oom", "MemoryError": "cuda_oom", "_ArrayMemoryError": "cuda_oom", "ArrayMemoryError": "cuda_oom",
    "ModuleNotFoundError": "missing_dependency", "ImportError": "missing_dependency",
    "UnidentifiedImageError": "image_format", "DecompressionBombError": "image_format", "DecompressionBombWarning": "image_format",
    "ImageError": "image_format", "TiffFileError": "image_format",
    "ValidationError": "validation_error", "RequestValidationError": "validation_error",
    "TimeoutError": "queue_timeout", "ReadTimeout": "queue_timeout", "ReadTimeoutError": "queue_timeout",
    "ConnectTimeout": "queue_timeout", "ConnectTimeoutError": "queue_timeout", "PoolTimeout": "queue_timeout",
    "SoftTimeLimitExceeded": "queue_timeout", "TimeLimitExceeded": "queue_timeout", "CircuitBreakerError": "queue_timeout",
    "DeadlineExceeded": "queue_timeout", "GatewayTimeout": "queue_timeout",
    "UnpicklingError": "weights_missing", "SafetensorError": "weights_missing", "EOFError": "weights_missing",
    "BadZipFile": "weights_missing", "WeightsError": "weights_mismatch",
    "GEOSException": "postprocessing", "TopologicalError": "postprocessing", "ShapelyError": "postprocessing",
    "InvalidDicomError": "image_format", "UnsupportedFileFormatError": "image_format", "UnknownFormatException": "image_format",
}


def strip_prefix(line: str) -> str:
    """``line`` without a quote, pytest, rich-box, compose or code-fence prefix."""
    stripped = _PREFIX.sub("", line, count=1)
    return _strip_suffix(stripped) if stripped is not line else line


def _strip_suffix(line: str) -> str:
    """``line`` without a closing box bar or code fence (and the blanks around it), when it ends with one.

    Plain string operations, not a regex: ``\\s*[│┃]\\s*$`` tried at every blank of a long blank run
    is quadratic in the run's length.
    """
    end = line.rstrip()
    if end.endswith(("│", "┃")):
        return end[:-1].rstrip()
    ticks = len(end) - len(end.rstrip("`"))
    return end[:-min(ticks, 3)].rstrip() if ticks and ticks <= 3 else (end[:-3] if ticks else line)


def is_frame(line: str) -> bool:
    """A stack-frame line (CPython, IPython, rich, Java, C backtrace) or a caret marker line."""
    return bool(_FRAME.match(line) or _CARETS.match(line))


def is_frame_header(line: str) -> bool:
    """The first line of a stack frame (CPython, IPython, rich): a traceback is under way."""
    return bool(_FRAME_HEADER.match(line))


# ---- exception names, found in linear time ---------------------------------------------------
# ``[\w.]*(?:Error|...)\w*`` backtracks to every "Error" of a long word and rescans the rest of the
# word from each: quadratic. The name is matched as one run instead and the type word looked for
# with ``str.find`` (see :func:`names_exception`).
EXCEPTION_WORDS = ("Error", "Exception", "Exit", "Interrupt", "Warning", "Exceeded", "Timeout", "Full", "Killed")
_EXC_NAME = re.compile(r"^\s{0,4}([A-Za-z_][\w.]*)(?::|\uff1a|$)")
_IPY_NAME = re.compile(r"^\s*([A-Za-z_][\w.]*)\s{2,}Traceback \(most recent call last\)")


def names_exception(name: str, words: tuple[str, ...] = EXCEPTION_WORDS, capital: bool = False) -> bool:
    """True when the last dotted part of ``name`` holds one of ``words`` after its first character.

    That is ``[\\w.]*X(?:Error|...)\\w*`` (``capital``: ``[A-Z]\\w*(?:Error|...)\\w*`` for the last
    part) without the backtracking: ``ValueError``, ``torch.OutOfMemoryError``, not ``Error`` alone.
    """
    part = name.rfind(".") + 1
    if capital and not "A" <= name[part:part + 1] <= "Z":
        return False
    return any(name.find(word, max(part + capital, 1)) >= 0 for word in words)


def exception_name(line: str) -> str:
    """The exception type a line starts with (``ValueError`` of ``ValueError: bad``), or ""."""
    match = _EXC_NAME.match(line)
    return match.group(1) if match and names_exception(match.group(1)) else ""


def ipython_header_name(line: str) -> str:
    """The exception type of an IPython traceback header (``ValueError   Traceback (most recent call last)``), or ""."""
    match = _IPY_NAME.match(line)
    return match.group(1) if match and names_exception(match.group(1), EXCEPTION_WORDS[:7]) else ""


def type_class(exc_type: str) -> str | None:
    """The failure class an exception type names on its own, or None."""
    if exc_type in _TYPES:
        return _TYPES[exc_type]
    return next((cls for prefix, cls in _TYPE_PREFIXES if exc_type.startswith(prefix)), None)


# ---- tensor types: device or dtype? -------------------------------------------------------
_TENSOR_TYPE = re.compile(r"\btorch\.(cuda\.|mps\.)?(\w+?)Tensor\b")


def _tensor_pair(text: str) -> str | None:
    """device_mismatch when two named tensor types differ in device, dtype_mismatch when only in dtype."""
    for line in text.splitlines():
        found = _TENSOR_TYPE.findall(line)
        if len({f for f in found}) < 2:
            continue
        devices = {dev for dev, _ in found}
        if len(devices) > 1:
            return "device_mismatch"
        if len({kind for _, kind in found}) > 1:
            return "dtype_mismatch"
    return None


# ---- a missing or unreadable file: weights or image? --------------------------------------
_NO_FILE = re.compile(r"\b(FileNotFoundError|IsADirectoryError|NotADirectoryError|No such file or directory|Is a directory"
                      r"|does not exist|cannot find the (file|path))\b", _FLAGS)
_IMAGE_SIDE = re.compile(r"\.(png|jpe?g|tiff?|bmp|gif|webp)\b|Image\.open|imread|imageio|tifffile|PIL[/\\.]", _FLAGS)
_WEIGHTS_SIDE = re.compile(r"\.(pth|pt|ckpt|safetensors|bin|h5|onnx|pkl|t7|weights)\b|torch\.load|serialization\.py|load_state_dict"
                           r"|checkpoint|ckpt|from_pretrained|safe_open|weights?\b", _FLAGS)


def _missing_file(text: str) -> str | None:
    if not _NO_FILE.search(text):
        return None
    last = next((ln for ln in reversed(text.splitlines()) if _NO_FILE.search(ln)), "")
    for scope in (last, text):  # the message first, then the frames around it
        image, weights = bool(_IMAGE_SIDE.search(scope)), bool(_WEIGHTS_SIDE.search(scope))
        if image != weights:
            return "image_format" if image else "weights_missing"
    return None


# ---- the call that raised: which stage failed? ---------------------------------------------
_CALLS = (
    ("postprocessing", re.compile(r"findContours|find_contours|approxPolyDP|drawContours|contourArea|regionprops|Polygon\(|LinearRing"
                                  r"|mask_to_polygons|frPyObjects", re.I)),
    ("image_format", re.compile(r"Image\.open|imread|imageio\.|tifffile\.|\.convert\(['\"]|ImageOps\.", re.I)),
    ("weights_missing", re.compile(r"torch\.load\(|safe_open\(|load_file\(|hub\.load|download_url_to_file|hf_hub_download|urlretrieve"
                                   r"|snapshot_download|cache_model_path|load_state_dict_from_url", re.I)),
)
_ARROW = re.compile(r"^\s*-*>\s*\d+\s+(.*)$")


def _failing_calls(lines: list[str], depth: int = 4) -> list[str]:
    """Source lines of the innermost ``depth`` frames (CPython, IPython arrows), innermost first."""
    calls: list[str] = []
    for i in range(len(lines) - 1, -1, -1):
        arrow = _ARROW.match(lines[i])
        if arrow:
            calls.append(arrow.group(1))
        elif re.match(r'^\s*File "', lines[i]) and i + 1 < len(lines) and not is_frame(lines[i + 1]):
            calls.append(lines[i + 1])
        if len(calls) == depth:
            break
    return calls


# ---- an OpenCV assertion: the function names the stage, the condition may name a type ------
_CV_ASSERT = re.compile(r"(?:Assertion failed|error: \(-\d+(?::[^)\n]{0,300})?\))[^\n]{0,300}?in function '?(?:cv::)?(\w{1,200})", re.I)
# Functions of point sets (a contour): their depth checks fail on an empty or malformed contour far
# more often than on a wrong dtype, so the stage decides, not the condition.
_POINT_SET_NAMES = (r"\w*[Cc]ontours?\w*|approxPolyDP|convexHull|convexityDefects|arcLength|moments|boundingRect"
                    r"|minAreaRect|fitEllipse\w*|pointPolygonTest|minEnclosingCircle|fillPoly|polylines")
_CV_POINT_SETS = re.compile(_POINT_SET_NAMES, re.I)
_CV_FUNCTIONS = (
    ("image_format", re.compile(r"imshow|imread|imwrite|imdecode|imencode|cvtColor|CvtHelper|resize|warpAffine|VideoCapture", re.I)),
    ("postprocessing", re.compile(_POINT_SET_NAMES + r"|connectedComponents\w*|threshold", re.I)),
)
_CV_TYPE_CHECK = re.compile(r"depth\(\)|CV_\d+[USF]|type\(\) ==|data type", re.I)


def _opencv_stage(text: str) -> str | None:
    """The class an OpenCV assertion points to: a type check, else the stage of the failing function."""
    match = _CV_ASSERT.search(text)
    if not match:
        return None
    if _CV_TYPE_CHECK.search(match.group(0)) and not _CV_POINT_SETS.fullmatch(match.group(1)):
        return "dtype_mismatch"
    return next((cls for cls, rx in _CV_FUNCTIONS if rx.fullmatch(match.group(1))), None)


def _failing_stage(text: str) -> str | None:
    calls = _failing_calls(text.splitlines()[-120:])
    return next((cls for call in calls for cls, rx in _CALLS if rx.search(call)), None)


# Each context rule and the score its class gets: the wording-free evidence of one block.
_CONTEXT_RULES = ((_failing_stage, 4.0), (_opencv_stage, 4.5), (_tensor_pair, 6.5), (_missing_file, 5.5))


def context_scores(text: str, exc_type: str) -> list[tuple[str, float]]:
    """Extra (class, score) evidence for one error block from its structure, not its wording."""
    found = [(rule(text), score) for rule, score in _CONTEXT_RULES] + [(type_class(exc_type), 3.0)]
    return [(cls, score) for cls, score in found if cls] + library_context_scores(text)


# ---- which error caused which --------------------------------------------------------------
_KILL = re.compile(r"SIGKILL|signal 9|\bKilled\b|exit(ed)?( with)?( code)?:? ?137|\(137\)", _FLAGS)
_TIMEOUT_CAUSE = re.compile(r"WORKER TIMEOUT|TimeLimitExceeded|Hard time limit|timed out|Timeout", _FLAGS)


def caused_by_earlier(failure_class: str, evidence: str, earlier: list[tuple[str, str]]) -> bool:
    """True when this diagnosis is the consequence of an earlier one in the same input.

    A worker killed with SIGKILL right after its timeout (gunicorn kills a timed-out worker,
    then logs "Perhaps out of memory?") was killed by the timeout, not by memory.
    """
    if failure_class != "cuda_oom" or not _KILL.search(evidence):
        return False
    if re.search(r"out of memory:|oom", evidence.replace("Perhaps out of memory", ""), re.I):
        return False  # the kernel's own OOM report: memory it was
    return any(cls == "queue_timeout" and _TIMEOUT_CAUSE.search(ev) for cls, ev in earlier)
