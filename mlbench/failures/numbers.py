"""The numbers :func:`mlbench.triage` pulls out of an error text, per failure class.

Memory (requested, free, total, in bytes), missing/unexpected keys and mismatched
parameter shapes, tensor sizes, dtypes, devices, module and library names, HTTP status
codes, fields and timeouts. Each extractor takes the error block's text and returns a
small JSON-ready dict; :func:`describe` turns it into the sentence of the explanation.
"""

from __future__ import annotations

import re
from typing import Any

from mlbench.failures.rules import PIP_NAMES
from mlbench.findings import format_bytes

__all__ = ["extract", "describe", "specific_fix", "parse_bytes"]

_UNITS = {"b": 1, "bytes": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
# From a number's first digit only: tried at every digit of a long digit run, the number is quadratic.
_SIZE = r"(?<!\d)(\d+(?:\.\d*)?)\s?(bytes|[KMGT]i?B|[KMGT](?=\s?\(\d+ bytes\))|B)\b"


def parse_bytes(number: str, unit: str) -> int:
    """``("2.00", "GiB")`` -> 2147483648."""
    return int(float(number) * _UNITS[unit.lower()])


def _first_size(text: str, *patterns: str) -> int | None:
    for pattern in patterns:
        match = re.search(pattern.replace("SIZE", _SIZE), text, re.I)
        if match:
            return parse_bytes(match.group(1), match.group(2))
    return None


def _exact_bytes(text: str) -> int | None:
    """The byte count TensorFlow prints next to a rounded size: 'allocate 2.12G (2282521344 bytes)'."""
    match = re.search(r"allocate [\d.]+\s?[^\W\d]* \((\d+) bytes\)", text, re.I)  # the unit has no digit: no backtracking
    return int(match.group(1)) if match else None


def _memory(text: str) -> dict[str, Any]:
    out = {
        "requested_bytes": _exact_bytes(text) or _first_size(text, r"(?:tried to )?allocate SIZE", r"Unable to allocate SIZE"),
        "total_bytes": _first_size(text, r"SIZE total capacity", r"total capac\w{0,3}y of SIZE"),
        "free_bytes": _first_size(text, r"of which SIZE (?:is )?free", r"SIZE free"),
        "allocated_bytes": _first_size(text, r"SIZE already allocated", r"SIZE is allocated by PyTorch"),
        "reserved_bytes": _first_size(text, r"SIZE reserved in total", r"SIZE is reserved by PyTorch"),
    }
    if out["requested_bytes"] is None:
        match = re.search(r"allocate (\d+) bytes", text, re.I)
        out["requested_bytes"] = int(match.group(1)) if match else None
    gpu = re.search(r"GPU (\d+)", text)
    out["device"] = f"cuda:{gpu.group(1)}" if gpu else ("cpu" if re.search(r"CPU|DefaultCPUAllocator|array with shape", text) else None)
    return {k: v for k, v in out.items() if v is not None}


_KEYS_END = re.compile(r"\.[^\S\n]*$|\n[^\S\n]*\w+ key\(s\)|\n[^\S\n]*size mismatch", re.I | re.M)


def _keys(section: str, text: str) -> list[str]:
    """The keys listed after ``<section> key(s) in state_dict:``, up to the next section (at most 200,000
    characters): found with one search each, never a lazy scan per header."""
    match = re.search(section + r" key\(s\) in state_dict:", text, re.I)
    if not match:
        return []
    end = _KEYS_END.search(text, match.end(), match.end() + 200_001)
    return re.findall(r'"([^"]+)"', text[match.end():end.start() if end else match.end() + 200_000])


def _weights(text: str) -> dict[str, Any]:
    missing, unexpected = _keys("Missing", text), _keys("Unexpected", text)
    sizes = re.findall(r"size mismatch for ([\w.]+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from checkpoint, "
                       r"the shape in current model is torch\.Size\(\[([\d, ]*)\]\)", text)
    out: dict[str, Any] = {"missing_keys": len(missing), "unexpected_keys": len(unexpected),
                           "missing_examples": missing[:3], "unexpected_examples": unexpected[:3]}
    if sizes:
        out["size_mismatches"] = [{"key": k, "checkpoint": f"[{a}]", "model": f"[{b}]"} for k, a, b in sizes[:5]]
        out["size_mismatch_count"] = len(sizes)
    if unexpected and all(k.startswith("module.") for k in unexpected) and not any(k.startswith("module.") for k in missing):
        out["prefix"] = "module."
    glob = re.search(r"GLOBAL ([\w.]+)|Unsupported (?:class|global:?) (?!GLOBAL )([\w.]+)", text)
    if glob:
        out["unsafe_global"] = glob.group(1) or glob.group(2)
    return {k: v for k, v in out.items() if v not in ([], 0) or k in ("missing_keys", "unexpected_keys")}


def _shape(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"size of tensor a \((\d+)\) must match the size of tensor b \((\d+)\) at non-singleton dimension (\d+)", text)
    if m:
        out.update(size_a=int(m.group(1)), size_b=int(m.group(2)), dimension=int(m.group(3)))
    m = re.search(r"\((\d+)x(\d+) and (\d+)x(\d+)\)", text)
    if m:
        out.update(mat1=[int(m.group(1)), int(m.group(2))], mat2=[int(m.group(3)), int(m.group(4))])
    m = re.search(r"to have (\d+) channels, but got (\d+) channels", text)
    if m:
        out.update(expected_channels=int(m.group(1)), got_channels=int(m.group(2)))
    shapes = re.findall(r"(?:torch\.Size\(|shape |shapes |input\[|size )\(?\[?([\d]+(?:, ?-?\d+)+)", text)
    if shapes:
        out["shapes"] = [f"({s.replace(' ', '')})" for s in shapes[:4]]
    return out


def _dependency(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = (re.search(r"No module named ['\"]?([\w.]+)", text)
         or re.search(r"requires the ['\"]?([\w-]+)['\"]? (?:package|library)", text)
         or re.search(r"requires ['\"]([\w-]+)['\"] to be installed", text))
    if m:
        module = m.group(1).rstrip(".")  # "No module named skimage." ends a sentence
        out["module"] = module
        out["pip_package"] = PIP_NAMES.get(module.split(".")[0], module.split(".")[0].replace("_", "-"))
    m = re.search(r"cannot import name ['\"]?(\w+)['\"]? from ['\"]?([\w.]+)", text)
    if m:
        out.update(name=m.group(1), module=m.group(2))
    m = (re.search(r"(?<![\w.+-])([\w.+-]+\.so(?:\.[\d.]+)?): cannot open shared object file", text)
         or re.search(r"Error loading shared library ([\w.+-]+\.so(?:\.[\d.]+)?)", text))
    if m:
        out["library"] = m.group(1)
    if re.search(r"NumPy 1\.x cannot be run in|_ARRAY_API not found|NumPy 2", text):
        out["abi"] = "numpy 1.x/2.x"
    elif re.search(r"numpy\.dtype size changed|multiarray failed to import|compiled against API version", text):
        out["abi"] = "NumPy C API"
    package = _broken_extension(text)
    if package:
        out.update(module=package, pip_package=PIP_NAMES.get(package, package), broken_extension=True)
    m = re.search(r"module '([\w.]+)' has no attribute '(\w+)'", text)
    if m and "module" not in out:
        out.update(module=m.group(1), missing_attribute=m.group(2))
    return out


_UNDEFINED = re.compile(r"\.(?:so|pyd)[^\n]{0,20}?: undefined symbol")
_PACKAGE_DIR = re.compile(r"(?:site|dist)-packages[/\\]([\w-]+)[/\\]")


def _broken_extension(text: str) -> str | None:
    """The package folder of the first ``site-packages/<pkg>/...so: undefined symbol`` (the path is read
    back from each ``.so: undefined symbol``, at most 300 characters, not scanned forward from every folder)."""
    for match in _UNDEFINED.finditer(text):
        start = max(0, match.start() - 300)
        path = re.split(r"[\s:]", text[start:match.start()])[-1]  # the path: no blank or colon in it
        folder = _PACKAGE_DIR.search(path)
        if folder:
            return folder.group(1)
    return None


_LOAD_KEYS = {"v": "a Git LFS pointer (run git lfs pull)", "<": "an HTML page (a failed or redirected download)",
              "\\x00": "zero-filled or truncated"}


def _weights_file(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = re.search(r"invalid load key, '([^']{1,6})'", text)
    if m:
        out["load_key"] = m.group(1)
        out["file_is"] = _LOAD_KEYS.get(m.group(1), "not a torch checkpoint")
    elif re.search(r"failed finding central directory|unexpected EOF|Ran out of input|HeaderTooSmall|MetadataIncompleteBuffer", text, re.I):
        out["file_is"] = "truncated or empty (an interrupted download or copy)"
    elif re.search(r"HeaderTooLarge|header too large|version https://git-lfs", text, re.I):
        out["file_is"] = "not a safetensors file (often a Git LFS pointer or an HTML page)"
    m = re.search(r"(?:No such file or directory|Is a directory|does not exist)\W{0,3}'([^'\n]{1,300})'", text)
    if m:
        out["path"] = m.group(1)
    return out


def _devices(text: str) -> dict[str, Any]:
    devices = sorted(set(re.findall(r"\b(cuda:\d+|cpu|mps(?::\d+)?)\b", text)))
    m = re.search(r"Input type \(([\w.]+)\) and weight type \(([\w.]+)\)", text)
    out: dict[str, Any] = {"devices": devices} if devices else {}
    if m:
        out.update(input_type=m.group(1), weight_type=m.group(2))
    m = re.search(r"NVML library version:? ?([\d.]+)", text)
    if m:
        out["nvml_library_version"] = m.group(1)
    m = re.search(r"unsatisfied condition: cuda ?>= ?([\d.]+)", text)
    if m:
        out["required_cuda"] = m.group(1)
    m = re.search(r"capability (sm_\d+) is not compatible", text)
    if m:
        out["gpu_capability"] = m.group(1)
        out["supported_capabilities"] = re.findall(r"\bsm_\d+", text[m.end():m.end() + 300])
    return out


def _dtypes(text: str) -> dict[str, Any]:
    """What the operation expected and what it found: the weight's type is the model's and the
    input's what arrived; a cast "from dtype(a) to dtype(b)" found a and wanted b."""
    m = re.search(r"expected scalar type (\w+) but found (\w+)", text)
    if m:
        return {"expected": m.group(1), "found": m.group(2)}
    m = (re.search(r"Input type \(([\w.:]+)\) and (?:weight|bias) type \(([\w.:]+)\)", text)
         or re.search(r"from dtype\('(\w+)'\) to dtype\('(\w+)'\)", text))
    return {"expected": m.group(2), "found": m.group(1)} if m else {}


def _http(text: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    final = [m for m in re.finditer(r"(?:HTTP/[\d.]+\"?\s+|status(?:[ _]?code)?\W{0,3})([1-5]\d\d)\b", text)
             if not m.group(1).startswith("1")]  # 100 Continue is not the answer
    m = (final[-1] if final and text[final[-1].start():final[-1].start() + 5] == "HTTP/" else final[0] if final else None
         ) or re.search(r"\b(4[0-2]\d|50[0-4])\s+[A-Z][a-z]", text)
    if m:
        out["status"] = int(m.group(1))
    fields = re.findall(r"\"loc\": ?\[([^\]]{0,300})\]", text) or re.findall(r"'loc': ?\(([^)]{0,300})\)", text)
    if fields:
        out["fields"] = [re.sub(r"[\s\"']", "", f) for f in fields[:5]]  # pretty-printed JSON spans lines
    m = re.search(r"(?:read timeout|timeout)\s?=\s?(\d+(?:\.\d+)?)", text, re.I) or re.search(r"after (\d+(?:\.\d+)?) ?s(?:econds)?\b", text)
    if m:
        out["timeout_s"] = float(m.group(1))
    return out


def _image(text: str) -> dict[str, Any]:
    m = re.search(r"['\"]([^'\"\n]{1,200}\.(?:png|jpe?g|tiff?|bmp|gif|webp))['\"]", text, re.I)
    return {"file": m.group(1)} if m else {}


_EXTRACT = {"cuda_oom": _memory, "weights_missing": _weights_file, "weights_mismatch": _weights, "shape_mismatch": _shape, "missing_dependency": _dependency,
            "device_mismatch": _devices, "dtype_mismatch": _dtypes, "validation_error": _http, "queue_timeout": _http,
            "image_format": _image}


def extract(failure_class: str, text: str) -> dict[str, Any]:
    """The numbers of ``failure_class`` found in ``text`` (empty dict when none)."""
    fn = _EXTRACT.get(failure_class)
    return fn(text[:400000]) if fn else {}


def describe(failure_class: str, numbers: dict[str, Any]) -> str:
    """One sentence with the numbers, e.g. 'requested 2.00 GiB with 1.31 GiB free of 23.69 GiB'."""
    n = numbers
    if failure_class == "cuda_oom" and "requested_bytes" in n:
        parts = [f"requested {format_bytes(n['requested_bytes'])}"]
        parts += [f"with {format_bytes(n['free_bytes'])} free"] if "free_bytes" in n else []
        parts += [f"of {format_bytes(n['total_bytes'])} total"] if "total_bytes" in n else []
        return " ".join(parts) + (f" on {n['device']}" if "device" in n else "")
    if failure_class == "weights_mismatch" and (n.get("missing_keys") or n.get("unexpected_keys") or "size_mismatches" in n or "unsafe_global" in n):
        text = f"{n.get('missing_keys', 0)} missing key(s) {n.get('missing_examples', [])[:2]}, {n.get('unexpected_keys', 0)} unexpected {n.get('unexpected_examples', [])[:2]}"
        if "size_mismatches" in n:
            first = n["size_mismatches"][0]
            text += f", {n['size_mismatch_count']} size mismatch(es), first {first['key']}: checkpoint {first['checkpoint']} vs model {first['model']}"
        return text + (f"; pickled global {n['unsafe_global']} is not allowed" if "unsafe_global" in n else "")
    if failure_class == "shape_mismatch" and "size_a" in n:
        why = (" (input sides not a multiple of the model's downsampling?)" if _off_by_downsampling(n["size_a"], n["size_b"])
               else f" ({_CHANNELS[frozenset((n['size_a'], n['size_b']))]}?)" if frozenset((n["size_a"], n["size_b"])) in _CHANNELS
               else "")
        return f"size {n['size_a']} vs {n['size_b']} at dimension {n['dimension']}{why}"
    if failure_class == "shape_mismatch" and "expected_channels" in n:
        return f"the model expects {n['expected_channels']} channels, the input has {n['got_channels']}"
    if failure_class == "shape_mismatch" and "mat1" in n:
        return f"a ({n['mat1'][0]}x{n['mat1'][1]}) input meets a ({n['mat2'][0]}x{n['mat2'][1]}) weight"
    if failure_class == "missing_dependency" and "missing_attribute" in n:
        return f"{n['module']}.{n['missing_attribute']} does not exist in the installed version (removed or renamed)"
    if failure_class == "missing_dependency" and ("module" in n or "library" in n or "abi" in n):
        what = n.get("library") or n.get("module") or "a compiled extension"
        if "." in str(n.get("module", "")) and "library" not in n and "name" not in n:
            top = n["module"].split(".")[0]
            return f"{n['module']} cannot be imported: {top} is installed (Python names the first part missing) but not the version with {n['module']}"
        return f"{what} cannot be imported" + (f" (a {n['abi']} ABI clash)" if "abi" in n else "")
    if failure_class == "weights_missing" and ("file_is" in n or "path" in n):
        return ", ".join(filter(None, [f"the file is {n['file_is']}" if "file_is" in n else "", f"path {n['path']}" if "path" in n else ""]))
    if failure_class == "device_mismatch" and ("required_cuda" in n or "gpu_capability" in n):
        if "required_cuda" in n:
            return f"the container needs a driver for CUDA >= {n['required_cuda']}"
        return f"this torch build has no kernels for the GPU's {n['gpu_capability']} (built for {' '.join(n['supported_capabilities']) or 'other GPUs'})"
    if failure_class == "dtype_mismatch" and n:
        return f"expected {n['expected']}, found {n['found']}"
    if failure_class == "device_mismatch" and n.get("devices"):
        return "devices involved: " + ", ".join(n["devices"])
    if failure_class in ("validation_error", "queue_timeout") and n:
        return ", ".join(f"{k} {v}" for k, v in n.items())
    if failure_class == "image_format" and n:
        return f"file {n['file']}"
    return ""


def specific_fix(failure_class: str, numbers: dict[str, Any]) -> str | None:
    """A fix naming the exact package, prefix or size, when the numbers allow one."""
    n = numbers
    if failure_class == "missing_dependency" and n.get("broken_extension"):
        return f"reinstall {n['pip_package']} built for the installed torch/numpy (pip install --force-reinstall {n['pip_package']}), then `mlbench doctor`"
    if failure_class == "missing_dependency" and "missing_attribute" in n:
        return (f"{n['module']}.{n['missing_attribute']} was removed in the installed version: pin the version the code was written "
                f"for or update the call to the new API")
    if failure_class == "missing_dependency" and "." in str(n.get("module", "")) and "pip_package" in n and "name" not in n:
        top = n["module"].split(".")[0]
        return (f"{top} is installed but is another version than the code (or the pickled model) was written for, one "
                f"without {n['module']}: install the version it needs (pip install -U {n['pip_package']}, or pin the "
                "older one the code names); for a pickled model, re-save its state_dict where it loads")
    if failure_class == "missing_dependency" and "pip_package" in n:
        return f"pip install {n['pip_package']} (into the same environment as the kernel/service), then `mlbench doctor`"
    if failure_class == "missing_dependency" and n.get("abi") == "numpy 1.x/2.x":
        return "reinstall the package that failed against the installed NumPy (or pin numpy<2 until it ships a NumPy 2 build)"
    if failure_class == "missing_dependency" and "abi" in n:
        return ("the failing extension was built against another NumPy than the installed one: reinstall it "
                "(pip install --force-reinstall --no-cache-dir PACKAGE) or install the NumPy it was built for")
    if failure_class == "missing_dependency" and str(n.get("library", "")).startswith("libGL"):
        return "use opencv-python-headless instead of opencv-python (or apt-get install libgl1)"
    if failure_class == "weights_mismatch" and n.get("prefix") == "module.":
        return ("the checkpoint was saved from DataParallel: strip the prefix with torch.nn.modules.utils."
                "consume_prefix_in_state_dict_if_present(state_dict, 'module.') and load with strict=True")
    if failure_class == "weights_mismatch" and "unsafe_global" in n:
        return (f"if you trust the file: with torch.serialization.safe_globals([{n['unsafe_global']}]): torch.load(path); "
                "better, re-save only the state_dict as safetensors")
    if failure_class == "cuda_oom" and n.get("free_bytes", 0) >= max(1 << 30, 10 * n.get("requested_bytes", 1 << 62)):
        return (f"the device reported {format_bytes(n['free_bytes'])} free, far more than the "
                f"{format_bytes(n['requested_bytes'])} asked for, so the model's size is not what failed: the free memory is "
                "fragmented (set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the process starts), this "
                "process is capped (torch.cuda.set_per_process_memory_fraction, a MIG slice, a container limit), or the "
                "driver failed (ROCm/HIP: update it, check dmesg); torch.cuda.memory_summary() shows reserved vs allocated")
    if failure_class == "shape_mismatch" and "size_a" in n and _off_by_downsampling(n["size_a"], n["size_b"]):
        return "resize or pad the input so height and width are multiples of 16 (or 32), or use a model with a size guard"
    if failure_class == "shape_mismatch" and "size_a" in n and frozenset((n["size_a"], n["size_b"])) in _CHANNELS:
        return ("give every image the channels the model takes: drop an alpha channel (Image.open(p).convert('RGB'), "
                "x[:, :3]) and repeat a grey one (convert('RGB'), x.expand(-1, 3, -1, -1)); mb.read_image reports them")
    return _FIXES[failure_class](n) if failure_class in _FIXES else None


_CHANNELS = {frozenset((3, 4)): "an RGBA image where RGB is expected, or the reverse",
             frozenset((1, 3)): "a grey image where RGB is expected, or the reverse",
             frozenset((1, 4)): "a grey image where RGBA is expected, or the reverse"}
"""Size pairs that are channel counts of images far more often than map sides."""


def _off_by_downsampling(a: int, b: int) -> bool:
    """Whether two sizes differ as a skip connection's do when the input side is not a multiple of
    the downsampling: by a pixel or two, not by a factor (a doubled batch or sequence), and not as
    the channel counts of images do (3 vs 4: RGB and RGBA)."""
    return 0 < abs(a - b) <= max(2, min(a, b) // 16) and frozenset((a, b)) not in _CHANNELS


def _weights_file_fix(n: dict[str, Any]) -> str | None:
    if "load_key" not in n:
        return None
    return f"the weights file is {n['file_is']}: fetch the real file again and verify its sha256 (mb.check_weights(path))"


def _device_fix(n: dict[str, Any]) -> str | None:
    if "required_cuda" in n:
        return f"update the host NVIDIA driver to one that supports CUDA {n['required_cuda']}, or use an image built for an older CUDA"
    if "gpu_capability" in n:
        return f"install a torch build whose CUDA version supports {n['gpu_capability']} (see pytorch.org/get-started), then `mlbench doctor`"
    return None


_FIXES = {"weights_missing": _weights_file_fix, "device_mismatch": _device_fix}
