"""Library-context rules of :func:`mlbench.triage`: wordings of other libraries, and which library raised.

:mod:`mlbench.failures.rules` holds the core wording of each failure class. The rules here add
the phrasings of the wider ecosystem that a user pastes from other projects (GDAL/rasterio,
h5py, TensorRT, Triton, pickle opcodes, timm, model hubs) and the context that decides between
two classes when the message alone is ambiguous:

- a timeout or refused connection to a model hub is a weights download that failed, not an
  overloaded service;
- a tensor-size clash of 4 (or 1) against 3 on the channel axis of an image transform is an
  RGBA (or grayscale) image fed to an RGB pipeline;
- the innermost stack frames name the library that raised (an image decoder, a geometry or
  COCO-mask library, the checkpoint loader), which decides when the message is unknown.

Patterns are bounded (no unbounded ``.*``) like those of :mod:`mlbench.failures.rules`.
"""

from __future__ import annotations

import re

from mlbench.failures.matching import Rule

__all__ = ["LIBRARY_RULES", "library_context_scores", "whole_input_diagnoses"]

_G = r"[^\n]{0,200}?"
_HUB = r"(?:(?<![\w-]\.)(?<!api-inference\.)huggingface\.co|hf\.co|cdn-lfs[\w.-]{0,100}|download\.pytorch\.org|(?:objects|raw)\.githubusercontent\.com|hf-mirror\.com)"
_NET_FAIL = r"(?:timed out|time ?out|Max retries exceeded|ConnectTimeout|ReadTimeout|Connection (?:refused|reset|aborted)|Name or service not known)"

LIBRARY_RULES: tuple[tuple[str, float, str], ...] = (
    # ---- weights_missing: the file could not be fetched, or is not a checkpoint at all --------
    ("weights_missing", 6.5, _HUB + _G + _NET_FAIL),
    ("weights_missing", 6.5, _NET_FAIL + _G + _HUB),
    ("weights_missing", 6.5, r"Unsupported operand \d+"),  # an unknown pickle opcode: corrupt or not a pickle
    ("weights_missing", 5.5, r"truncated file: eof = \d+|Unable to open file \((?:truncated file|file signature not found)"),
    ("weights_missing", 5.5, r"(?:pretrained|weights?|checkpoint)" + _G + r"(?:URL is invalid|do(?:es)? not exist|not (?:available|found))" + _G
                             + r"random initiali[sz]ation|\busing random initiali[sz]ation"),
    # ---- missing_dependency: an API of another version, an optional reader not installed ------
    ("missing_dependency", 5.5, r"got an unexpected keyword argument|is an invalid keyword argument for"),
    ("missing_dependency", 5, r"cannot find a suitable reader|no suitable (?:reader|backend|plugin) (?:found|available)"),
    ("missing_dependency", 6, r"serializ(?:ed|ation)[^\n]{0,40}engine" + _G + r"(?:mismatch|does not match)|(?:mismatch|does not match)" + _G
                              + r"serializ(?:ed|ation)[^\n]{0,40}engine"),  # a TensorRT engine built by another version
    # ---- device_mismatch / queue_timeout: NCCL test wording, a service that is not listening ---
    ("device_mismatch", 5, r"\bNCCL failure\b|\bunhandled (?:system|cuda) error\b"),
    ("queue_timeout", 4.5, r"ConnectionRefusedError|Connect call failed|All connection attempts failed|\bConnectError\b"),
    # ---- image_format: GDAL/rasterio cannot open the file -----------------------------------
    ("image_format", 5.5, r"not recogni[sz]ed as (?:being in )?a supported (?:file )?format|\bCPLE_OpenFailed"),
    # ---- shape_mismatch: destination size, ranks in TF/Triton wording -------------------------
    ("shape_mismatch", 6, r"!?dsize\.empty\(\)|dsize\.area\(\)"),
    ("shape_mismatch", 5.5, r"input has only \d+ dims?\b|out of range using input dim"),
    ("shape_mismatch", 6, r"\b\d-?D (?:or \d-?D )?(?:\(batch mode\) )?(?:input )?tensor (?:is )?expected|\bexpected (?:a )?\d-?D or \d-?D"),
    # ---- dtype_mismatch: OpenCV 2.x/3.x wording of the 8-bit single-channel requirement -------
    ("dtype_mismatch", 6.5, r"supports? only (?:CV_)?8U?C1\b|only 8uC1|8uC1 and 32sC1"),
    # ---- nan_output / normalization / postprocessing in the user's own words -------------------
    ("nan_output", 6, r"\b(?:loss|outputs?|predictions?|logits|results?)(?: values?)? (?:is|are|was|were|became|becomes|turns? into)"
                      r"(?: all| always| only| just)? (?:nan|inf)\b"),
    ("nan_output", 5.5, r"\b(?:sum|mean|max|min|norm|loss|std)\b[^\n]{0,25}[=:,]\s*'?\s*-?(?:nan|inf)\b"),
    ("normalization", 5, r"\b(?:get|getting|got|gives?|giving|returns?|returning|produces?) (?:a |an )?(?:completely |all |totally |entirely )?"
                         r"(?:black|blank|empty) (?:images?|masks?|outputs?|predictions?)"),
    ("postprocessing", 5.5, r"\b(?:logits?|outputs?|output tensors?|predictions?)[^\n]{0,20}\b(?:are|is|were)\s*(?:<\s*0|negative|less than 0|below 0)"
                            r"|without (?:a |the )?sigmoid|forg[eo]t (?:the |to apply (?:the )?)?(?:sigmoid|softmax)"),
    # ---- round 3: TensorFlow's memory warning, cuDNN libraries, OpenCV's zero scale, DICOM, geometry --
    ("cuda_oom", 5, r"Allocation of \d+ exceeds \d+% of (?:free )?system memory"),
    ("missing_dependency", 6.5, r"Could not load library libcudnn|Unable to load any of \{libcudnn|Cannot load symbol cudnn\w*"
                                r"|version libcudnn\w*\.so[\d.]* not defined|libcudnn\w*\.so[\d.]*: cannot open"),
    # no installed plugin opens even a common format (PNG, JPEG, TIFF): a reader package is missing
    ("missing_dependency", 6.5, r"Could not find a backend to open\W{0,3}[^\s`'\"]{0,200}\.(?:png|jpe?g|tiff?|bmp|gif|webp)\b"),
    ("shape_mismatch", 6.5, r"inv_scale_[xy]\s*>\s*0"),
    ("image_format", 5.5, r"\bio\.scif\.|\bloci\.formats\.|ImgIOException|UnknownFormatException"),
    ("image_format", 6, r"InvalidDicomError|'DICM' (?:marker|prefix)|not a valid DICOM|DICOM File Meta Information"),
    ("postprocessing", 6, r"Invalid number of points in LinearRing|Number of points must be 0 or|Points of LinearRing|GEOSException|TopologicalError"),
    ("postprocessing", 6.5, r"(?:Label|Labell?ed) image must be of integer|label_image must be"),
    ("cuda_oom", 6, r"The node (?:was low on resource: memory|had condition: \[MemoryPressure\])"),
    ("dtype_mismatch", 6, r"Unexpected input data type|PrimitiveDataType\w{0,100}(?:<\w{0,100}>?)?\) , expected"),
    ("device_mismatch", 6, r"Insufficient nvidia\.com/gpu|Insufficient (?:amd\.com|gpu\.intel\.com)/gpu"),
    ("postprocessing", 6, r"\b(?:p|pts|points|contour)\.checkVector\(2"),  # polygon points OpenCV cannot draw
    ("postprocessing", 5, r"\bmasks?\.xy\b|masks2segments|\bsegments?\b[^\n]{0,30}\b(?:is|are|was|were) empty"),
    ("cuda_oom", 6, r"memory usage threshold|System memory low at node|running low on memory|exceeds threshold [\d.]+, killing"),
    ("shape_mismatch", 6, r"\bexpects? \d+ dimensions|\baxes don't match array|axis \d+ is out of bounds for array of dimension \d+"),
    ("validation_error", 6, r"sent a request that this server could not understand"),
    ("normalization", 5, r"\bz-?score\b|\bstandardi[sz](?:e|ed|ation)\b|all pixels (?:at|are|=+) 0\b|\b(?:signal|intensity|dynamic) range\b"),
    ("normalization", 5, r"\b(?:get|getting|got|gives?|giving|returns?|produces?)\b[^\n]{0,20}\b(?:black|blank|empty|white)(?:\s+(?:black|blank|empty|white))?"
                         r"\s+(?:images?|masks?|outputs?|predictions?|results?)|\b(?:results?|outputs?|predictions?|masks?)\s+(?:are|is|were|was|look)"
                         r"\s+(?:all\s+)?(?:blank|black|empty|white)\b"),
    # ---- round 4: NumPy casting, OpenCV channel counts and writers, TIFF tiles, codecs, brokers ----
    ("dtype_mismatch", 6, r"could not be coerced to provided output parameter|according to the casting rule"),
    ("dtype_mismatch", 6.5, r"\bOnly 8-?bit (?:\d-channel |and \d+-?bit )?(?:(?:and|or) \d-channel )?(?:input|images?)"),  # a depth limit, not a channel one
    ("image_format", 6.5, r"!ssize\.empty\(\)|\bssize\.(?:area\(\)|width) > 0"),  # an empty source image: the root of a later zero scale
    ("shape_mismatch", 6.5, r"\b(?:channels|scn|dcn|cn)\s*==\s*\d\s*\|\|\s*(?:channels|scn|dcn|cn)\s*=="),  # OpenCV channel-count checks
    ("image_format", 6, r"can't write data|could not find a writer for the specified extension|\bimwrite_\("),
    ("image_format", 6, r"\binvalid tile (?:shape|size|offset|width|length)\b|\bTile(?:Width|Length)\b[^\n]{0,40}multiple of"),
    ("missing_dependency", 6.5, r"NotImplementedError: \w+_(?:en|de)code\b"),  # the installed codec package lacks this codec
    ("queue_timeout", 6, r"Connection to broker lost|consumer: Cannot connect to (?:amqp|redis|rediss|sqs|kafka)\w*://"),
    ("missing_dependency", 6, r"Received unregistered task|Did you remember to import the module containing this task"),  # not imported by the worker
    ("validation_error", 5.5, r"Invalid HTTP request received|illegal request line|HttpParserInvalid\w+|Invalid HTTP method"),
    # a supervisor that gave up without saying why: report it, but rank it after any real cause
    ("unknown", 5, r"Worker failed to boot|HaltServer"),
    # ---- round 5: CUDA index asserts, OpenCV's channel count, un-normalised input, absent checkpoints ----
    # the kernel assert names an index outside its tensor (labels >= n_classes, token ids >= vocab): not the device
    ("shape_mismatch", 6.5, r"Assertion `[^`\n]{0,120}(?:index out of bounds|srcIndex < srcSelectDimSize|idx_dim >= 0|t >= 0 && t < n_classes"
                            r"|index >= -\w+ && index < \w+|ind >= 0 && ind < )[^`\n]{0,80}` failed"),
    ("shape_mismatch", 6.5, r"Invalid number of channels in input image:?\W{0,20}'VScn::contains\(scn\)'\W{0,20}where\W{0,20}'scn' is \d"),
    # the user's own account: the input was not normalised (to [0, 1], or with the training mean/std)
    ("normalization", 6, r"\b(?:did ?n[o']t|do ?n[o']t|forg[eo]t(?: to)?|without|never|not)\s+(?:\w+\s+){0,2}norma?li[sz](?:e|ed|ing|ation)?\b"),
    ("weights_missing", 6, r"\bno (?:model |pretrained )?(?:checkpoint|weights?)(?: file| directory| dir)? (?:was )?found"
                           r"|os\.path\.(?:is)?file\((?:args\.|self\.|opt\.)?(?:model|ckpt|checkpoint|weights?|resume)\w*\)"),
)

# The innermost frames' files name the library that raised: decisive only when the message is not.
_FRAME_FILE = re.compile(r'^[^\S\n]*File "([^"\n]{1,500})", line \d+|^[^\S\n]*(\S{1,300}\.pyx?)(?::\d+)? in \S', re.M)
_FRAME_LIBRARIES = (
    ("image_format", re.compile(r"PIL[/\\]\w*(?:ImagePlugin|ImageFile)\.py|tifffile[/\\]|imageio[/\\]|rasterio[/\\]|skimage[/\\]io[/\\]"
                                r"|imagecodecs[/\\]|pydicom[/\\]|dicom[/\\]filereader|aicsimageio[/\\]|bioio\w*[/\\]|nd2[/\\]|czifile|pylibCZIrw"
                                r"|bioformats|SimpleITK[/\\]|nibabel[/\\]|openslide[/\\]", re.I)),
    ("postprocessing", re.compile(r"shapely[/\\]|pycocotools|pycococreatortools|_regionprops|skimage[/\\]measure[/\\]", re.I)),
    ("weights_missing", re.compile(r"torch[/\\]serialization\.py|safetensors[/\\]", re.I)),
    ("missing_dependency", re.compile(r"importlib[/\\]__init__\.py|<frozen importlib\._bootstrap", re.I)),  # cut inside an import
)
_LIBRARY_SCORE = 3.5

# A channel clash 4-vs-3 or 1-vs-3 in an image transform: an RGBA or grayscale image in an RGB pipeline.
_CHANNEL_CLASH = re.compile(r"size of tensor a \(([134])\) must match the size of tensor b \(([134])\) at non-singleton dimension [01]\b")
_IMAGE_TRANSFORM = re.compile(r"\bnormali[sz]e\b|ToTensor|Image\.open|transforms?[/\\.]", re.I)
_CHANNEL_SCORE = 8.0  # decisive over the generic size message on the exception line (6 x 1.25, plus repeats)


def _innermost_library(text: str) -> str | None:
    files = [m.group(1) or m.group(2) for m in _FRAME_FILE.finditer(text)][-3:]
    for path in reversed(files):
        cls = next((c for c, rx in _FRAME_LIBRARIES if rx.search(path)), None)
        if cls:
            return cls
    return None


def _channel_clash(text: str) -> str | None:
    match = _CHANNEL_CLASH.search(text)
    if match and {match.group(1), match.group(2)} in ({"3", "4"}, {"1", "3"}) and _IMAGE_TRANSFORM.search(text):
        return "image_format"
    return None


# PIL names an array it cannot take by its type key: more than one axis after (1, 1) is a shape problem.
_PIL_TYPEKEY = re.compile(r"(?:Cannot handle this data type: |KeyError: \()\(1, 1((?:, \d+)*)\), '?[|<>]\w\d+")
_PRINTED_SHAPE = re.compile(r"\(\d{2,6}, \d{2,6}((?:, \d{1,5}){1,2})\)")  # (H, W, C) or (H, W, C, N) as numpy prints it
# An HTTP or URL error raised while a model is built or its weights fetched: the download failed.
_URL_ERROR = re.compile(r"\b(?:HTTPError|URLError|ContentTooShortError|urlopen error)\b")
_MODEL_CONTEXT = re.compile(r"model_type|pretrained|load_model|model_path|cache_model|checkpoint|weights|torch\.hub|hub\.load|models[/\\]", re.I)
_DOWNLOAD = Rule("weights_missing", 0, r"download(?:ing)?\b[^\n]{0,300}?(?:models?[/\\]|weights|checkpoint|pretrained"
                 r"|\.(?:pth|pt|ckpt|safetensors|onnx|bin|h5|npy)\b)", re.I)  # a line gap: matched part by part
_NET_ERROR = re.compile(r"HTTP Error \d{3}|HTTPError|URLError|urlopen error|ContentTooShortError|Max retries exceeded|Connection (?:refused|reset|aborted)"
                        r"|Name or service not known|Temporary failure in name resolution|SSLError|CERTIFICATE_VERIFY_FAILED|timed out", re.I)


def _pil_typekey(text: str) -> str | None:
    """More than one axis after (1, 1), or a channel count PIL has no mode for (not 2, 3 or 4): a shape problem.
    Without a type key, an array shape printed next to the error that ends in such a channel count."""
    match = _PIL_TYPEKEY.search(text)
    if match:
        axes = match.group(1).split(",")[1:]
    elif "Cannot handle this data type" in text and (shape := _PRINTED_SHAPE.search(text)):
        axes = [a for a in shape.group(1).split(",") if a.strip()]
    else:
        axes = []
    return "shape_mismatch" if len(axes) >= 2 or (axes and axes[0].strip() not in ("2", "3", "4")) else None


def _model_download(text: str) -> str | None:
    return "weights_missing" if _URL_ERROR.search(text) and _MODEL_CONTEXT.search(text) else None


def library_context_scores(text: str) -> list[tuple[str, float]]:
    """(class, score) evidence from which library raised and what an image transform saw."""
    found = [(_innermost_library(text), _LIBRARY_SCORE), (_channel_clash(text), _CHANNEL_SCORE), (_pil_typekey(text), _CHANNEL_SCORE + 0.5),
             (_model_download(text), 5.5)]
    return [(cls, score) for cls, score in found if cls]


def whole_input_diagnoses(text: str, make) -> list:
    """When no single block is recognised: a model download announced in one line and a network error
    in another is a weights download that failed. ``make(cls, evidence, text, score, line, exc_type)``."""
    error = _NET_ERROR.search(text) if next(_DOWNLOAD.finditer(text), None) else None
    error = error or (_URL_ERROR.search(text) if _MODEL_CONTEXT.search(text) else None)
    if not error:
        return []
    start = text.rfind("\n", 0, error.start()) + 1
    end = text.find("\n", error.start())
    line = text[start:len(text) if end < 0 else end].strip()[:400]
    return [make("weights_missing", line, text, 5.0, text.count("\n", 0, start) + 1, "")]
