"""The rule base of :func:`mlbench.triage`: weighted patterns per failure class.

Each rule is ``(failure_class, weight, pattern)``. Weights run from 1 (a weak hint, e.g. a
bare exception type) to 6 (a message that names the failure, e.g. ``CUDA out of memory``).
Patterns are matched case-insensitively against one error block at a time (a traceback or
a log line), with ``re.M``; the class whose best rule weighs most wins. Patterns are
written from real error texts of torch, CUDA, cuDNN, NCCL, Pillow, OpenCV, tifffile, NumPy,
pydantic, FastAPI, uvicorn, gunicorn, Celery, Docker, the NVIDIA container toolkit,
safetensors, huggingface, timm and segmentation_models_pytorch; keep them linear: no unbounded
``.*`` between two parts (join parts with the lazy line gap ``_G``, which
:mod:`mlbench.failures.matching` matches part by part), no ``\\s*`` that can cross blank lines
under ``^``, and no ``[\\w]+X`` that every character of a long word would start (anchor such a run
with a look-behind); ``tests/test_triage.py`` times every rule on inputs built to make it backtrack.
"""

from __future__ import annotations

_G = r"[^\n]{0,200}?"  # a bounded gap on one line


def _http(code: int, phrase: str) -> str:
    """An HTTP status ``code`` only where it reads as one (not inside a size or a shape)."""
    return (rf"(?:HTTP/[\d.]+\"?\s+|status(?:[ _]?code)?\W{{0,3}}|\b(?:error|code|returned|got|response|responded|with)\W{{0,3}}"
            rf"|^\W{{0,3}}|\[|\(){code}\b|\b{code}\W{{0,3}}(?:{phrase})")


RULES: tuple[tuple[str, float, str], ...] = (
    # ---- cuda_oom: GPU or CPU out of memory ----------------------------------------------
    ("cuda_oom", 6, r"out of (shared |GPU |device |host |system |CPU |pinned )?memory|\bOOM when allocating"),
    ("cuda_oom", 5, r"killed by signal: (Killed|Bus error)|insufficient shared memory|\(shm\)|\bENOMEM\b|killed due to (memory|OOM)"),
    ("cuda_oom", 6, r"unable to write to file </torch_|No space left on device" + _G + r"/dev/shm|/dev/shm" + _G + r"No space left"),
    ("cuda_oom", 6, r"OutOfMemoryError"),
    ("cuda_oom", 5, r"tried to allocate" + _G + r"(bytes|[KMGT]i?B)"),
    ("cuda_oom", 5, r"DefaultCPUAllocator: (can't|not enough memory)"),
    ("cuda_oom", 5, r"Unable to allocate" + _G + r"for an array"),
    ("cuda_oom", 5, r"\bMemoryError\b"),
    ("cuda_oom", 5, r"(CUDNN|CUBLAS|CUSOLVER|CUFFT)_STATUS_ALLOC_FAILED"),
    ("cuda_oom", 5, r"\bOOM ?Kill(ed)?\b|\"OOMKilled\": ?true|oom-kill|oom_reaper|Out of memory: Kill"),
    ("cuda_oom", 4, r"exit(ed)? ?(with )?code\W{0,3}(137|-9)\b|exit status 137|Exited \(137\)|signal 9 \(SIGKILL\)|SIGKILL! Perhaps out of memory"),
    ("cuda_oom", 4, r"Worker (with pid \d+ )?was (sent|terminated)" + _G + r"(SIGKILL|signal 9)"),
    ("cuda_oom", 3, r"WorkerLostError" + _G + r"(signal 9|SIGKILL)"),
    ("cuda_oom", 3, r"\bKilled\.?\s*$|\bKilled\s+(python|process)"),
    ("cuda_oom", 4, r"cannot allocate memory|std::bad_alloc|failed to allocate memory"),
    ("cuda_oom", 4, r"(insufficient|not enough) (GPU |device |system |)memory|memory (limit|budget) exceeded"),
    ("cuda_oom", 4, r"CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation|RESOURCE_EXHAUSTED"),
    ("cuda_oom", 3, r"(GPU|VRAM|memory) (is )?(full|exhausted)"),
    ("cuda_oom", 3, r"PYTORCH_CUDA_ALLOC_CONF|expandable_segments"),
    ("cuda_oom", 7, r"WinError 1455|paging file is too small|页面文件太小|fichier de pagination est insuffisant"
     r"|Файл подкачки слишком мал"),  # Windows' virtual memory, hit while the CUDA DLLs load
    # ---- weights_missing: file absent, empty, truncated, corrupt --------------------------
    ("weights_missing", 6.5, r"Unable to load weights from|Unable to load (the )?(checkpoint|state dict)|could not (load|find) (the )?(weights|checkpoint)( file)?"),
    ("weights_missing", 5, r"PytorchStreamReader failed" + _G + r"(zip archive|central directory|reading file)"),
    ("weights_missing", 6.5, r"(error|fail|unable|could not|cannot|can't|refused|denied|timed out|\b40[34]\b)" + _G + r"download(ing)?" + _G + r"(weights|checkpoint|pretrained|\.pth\b|\.pt\b|\.safetensors|torch\.hub|hub\.load|model file)"),
    ("weights_missing", 6.5, r"download(ing)?" + _G + r"(weights|checkpoint|pretrained|\.pth\b|\.pt\b|\.safetensors|torch\.hub|hub\.load|model file)" + _G + r"(error|fail|refused|denied|timed out|incomplete|corrupt|\b40[34]\b)"),
    ("weights_missing", 5, r"failed finding central directory"),
    ("weights_missing", 5, r"invalid load key"),
    ("weights_missing", 5, r"unexpected EOF, expected \d+ more bytes|The file might be corrupted"),
    ("weights_missing", 5, r"\bEOFError: Ran out of input"),
    ("weights_missing", 4, r"^[^\S\n]*EOFError[^\S\n]*:?[^\S\n]*$"),  # blanks, not \s: \s* from each of many blank lines is quadratic
    ("weights_missing", 5, r"Error while deserializing header|HeaderTooLarge|HeaderTooSmall|MetadataIncompleteBuffer|InvalidHeaderDeserialization"),
    ("weights_missing", 5, r"(No such file|does not exist|not found|cannot find|can't find|missing)" + _G + r"\.(pth|pt|ckpt|safetensors|onnx|h5|pkl|bin|weights|tar)\b"),
    ("weights_missing", 5, r"\.(pth|pt|ckpt|safetensors|onnx|h5|pkl|bin|tar)['\"]?" + _G + r"(No such file|does not exist|not found)"),
    ("weights_missing", 5.5, r"Checkpoint " + _G + r" not found!|Checkpoint \{\} not found"),  # detectron2's checkpointer
    ("weights_missing", 5, r"\bNO_SUCHFILE\b|Load model from " + _G + r"failed" + _G + r"(doesn't|does not) exist"),  # ONNX Runtime
    ("weights_missing", 5, r"no version is available|failed to poll model|not found in any model repository"),  # Triton
    ("weights_missing", 4, r"(checkpoint|weights?|model) (file )?(not found|is missing|does not exist|missing)"),
    ("weights_missing", 4, r"no file named (pytorch_model\.bin|model\.safetensors|diffusion_pytorch_model)"),
    ("weights_missing", 4, r"Can't load (the )?(model|weights|config|tokenizer) for"),
    ("weights_missing", 4, r"(couldn't|could not|cannot) connect to ['\"]?https://huggingface\.co|LocalEntryNotFoundError|EntryNotFoundError"),
    ("weights_missing", 4, r"RepositoryNotFoundError|Repository Not Found for url|GatedRepoError|401 Client Error" + _G + r"huggingface"),
    ("weights_missing", 4, r"(download|fetch)(ing)? (of )?(the )?(pretrained )?(weights|checkpoint)" + _G + r"(failed|error)"),
    ("weights_missing", 4, r"No checkpoint found|checkpoint( file)? (is )?(empty|corrupt|truncated|damaged)"),
    ("weights_missing", 4, r"version https://git-lfs|git-lfs|LFS pointer"),
    ("weights_missing", 3, r"zipfile\.BadZipFile|(Bad|Invalid) magic number|magic_number|not a valid (checkpoint|zip)"),
    ("weights_missing", 5, r"PytorchStreamReader failed locating file data\.pkl"),
    ("weights_mismatch", 5.5, r"PytorchStreamReader failed locating file constants\.pkl"),
    ("weights_mismatch", 5.5, r"TorchScript archive|torch\.jit\.save\b|weights_only=True`{0,2} with TorchScript"),
    ("weights_missing", 3, r"sha256 (mismatch|does not match)|checksum (mismatch|failed)|hash mismatch"),
    ("weights_missing", 3, r"WeightsError" + _G + r"(missing|not found|sha256)"),
    # ---- weights_mismatch: architecture vs checkpoint, prefixes, unsafe globals ----------
    ("weights_mismatch", 6, r"Error\(s\) in loading state_dict"),
    ("weights_mismatch", 6, r"(Missing|Unexpected) key\(s\) in state_dict"),
    ("weights_mismatch", 6, r"(unexpected|missing) keys? in (source )?state_dict|state dict do not match"),
    ("weights_mismatch", 6, r"size mismatch for [\w.]+: copying a param"),
    ("weights_mismatch", 5, r"copying a param with shape|While copying the parameter named"),
    ("weights_mismatch", 5, r"Weights only load failed|Unsupported global: GLOBAL|WeightsUnpickler error"),
    ("weights_mismatch", 5, r"unsupported GLOBAL [\w.]+ whose module [\w.]+ is blocked"),
    ("weights_mismatch", 4, r"Some weights of" + _G + r"were not (initialized|used)"),
    ("weights_mismatch", 4, r"were not initialized from the model checkpoint|You should probably TRAIN this model"),
    ("weights_mismatch", 4, r"ignore_mismatched_sizes|mismatched sizes"),
    ("weights_mismatch", 4, r"(missing_keys|unexpected_keys)=\["),
    ("weights_mismatch", 4, r"_IncompatibleKeys"),
    ("weights_mismatch", 3, r"(state_dict|checkpoint)" + _G + r"(does not match|mismatch|incompatible|wrong architecture)"),
    ("weights_mismatch", 3, r"\bmodule\.[\w.]{1,300}\.(weight|bias)\b"),
    ("weights_mismatch", 3, r"pretrained_cfg|Pretrained (weights|cfg) (not|unavailable)"),
    ("weights_mismatch", 2, r"UnpicklingError"),
    ("weights_mismatch", 3, r"Can't get attribute '\w+' on <module"),
    ("weights_mismatch", 3, r"KeyError: '(state_dict|model_state_dict|model|net|params|ema)'"),
    # ---- device_mismatch: CUDA/CPU, drivers, container toolkit ---------------------------
    ("device_mismatch", 6, r"is not on the expected device|Tensor on device \w+ is not"),
    ("device_mismatch", 6, r"Expected all tensors to be on the same device"),
    ("device_mismatch", 6, r"can't convert cuda:?\d* device type tensor|Use Tensor\.cpu\(\)|is on (CPU|GPU|cuda:?\d*|cpu), but expected (it )?to be on|expected (it )?to be on (GPU|CPU|cuda)"),
    ("device_mismatch", 6, r"to have the same device as|(on|to|at) the same device|same device as|different devices|found (input )?tensor at (cpu|cuda)"),
    ("device_mismatch", 6, r"Input type \(torch\.cuda\.\w+\) and weight type \(torch\.\w+Tensor\)"),
    ("device_mismatch", 6, r"Input type \(torch\.\w+Tensor\) and weight type \(torch\.cuda\.\w+\)"),
    ("device_mismatch", 6, r"Input type \(\w+\) and weight type \(\w+\) should be the same or input should be a MKLDNN"),
    ("device_mismatch", 6, r"Attempting to deserialize object on (a )?CUDA device"),
    ("device_mismatch", 6, r"Torch not compiled with CUDA enabled|not compiled with (CUDA|cuda|MPS) support"),
    ("device_mismatch", 6, r"Found no NVIDIA driver|NVIDIA driver on your system is too old|no CUDA-capable device is detected"),
    ("device_mismatch", 6, r"CUDA driver version is insufficient|driver version is insufficient for (the )?CUDA runtime"),
    ("device_mismatch", 6, r"Driver/library version mismatch|NVML library version"),
    ("device_mismatch", 6, r"Failed to initialize NVML|NVMLError|nvmlInit|NVML_ERROR"),
    ("device_mismatch", 6, r"no kernel image is available for execution"),
    ("device_mismatch", 5, r"(is not compatible with the current PyTorch installation|sm_\d+ is not compatible|CUDA capability sm_\d+)"),
    ("device_mismatch", 6, r"could not select device driver" + _G + r"capabilities: \[\[gpu\]\]"),
    ("device_mismatch", 6, r"nvidia-container-cli|nvidia-container-runtime|nvidia-container-toolkit|unknown runtime specified nvidia|runtime name: nvidia|unsatisfied condition: cuda"),
    ("device_mismatch", 6, r"No CUDA GPUs are available|no CUDA GPUs|cudaGetDeviceCount|forward compatibility was attempted|CUDA initialization: "),
    ("device_mismatch", 7, r"libnvidia-ml\.so|libcuda\.so(\.1)?: cannot open|libcuda\.so" + _G + r"not found"),
    ("device_mismatch", 5, r"CUDA_ERROR_NO_DEVICE|cudaErrorNoDevice|CUDA_ERROR_NOT_INITIALIZED|cudaErrorInsufficientDriver"),
    ("device_mismatch", 5, r"CUDA error: (invalid device ordinal|initialization error|unknown error|misaligned address|an illegal memory access|operation not supported|CUDA-capable device)"),
    ("device_mismatch", 5, r"invalid device (ordinal|function)|CUDA unknown error"),
    ("device_mismatch", 5, r"CUDNN_STATUS_(NOT_INITIALIZED|MAPPING_ERROR|EXECUTION_FAILED|NOT_SUPPORTED|INTERNAL_ERROR|ARCH_MISMATCH|VERSION_MISMATCH|BAD_PARAM)"),
    ("device_mismatch", 5, r"cuDNN (version|error)|cudnn version incompatibility|CuDNN library needs to have matching"),
    ("device_mismatch", 5, r"CUBLAS_STATUS_(NOT_INITIALIZED|EXECUTION_FAILED|INTERNAL_ERROR|NOT_SUPPORTED|ARCH_MISMATCH|INVALID_VALUE)"),
    ("device_mismatch", 5, r"NCCL (error|WARN)|ncclUnhandledCudaError|ncclSystemError|ncclInternalError|ncclInvalidUsage|ProcessGroupNCCL"),
    ("device_mismatch", 4, r"device-side assert(ion)? triggered|CUDA kernel errors might be asynchronously reported"),
    ("device_mismatch", 5, r"an illegal memory access was encountered|cudaErrorIllegalAddress|cudaErrorMisalignedAddress"),
    ("device_mismatch", 5, r"No space left on device|\[Errno 28\]|\bENOSPC\b|Disk quota exceeded"),
    # torch.save onto a full disk: the zip writer's own words, with no errno (a reader's errors are weights_missing)
    ("device_mismatch", 5.5, r"PytorchStreamWriter failed writing|unexpected pos \d+ vs \d+"),
    ("device_mismatch", 4, r"CUDA_VISIBLE_DEVICES|torch\.cuda\.is_available\(\) (is|returns?) False"),
    ("device_mismatch", 4, r"Expected (a )?(\w+ )?(tensor|object) (of device type|for argument)" + _G + r"(cuda|cpu)"),
    ("device_mismatch", 4, r"expected device (cuda|cpu|mps)" + _G + r"(but )?got device"),
    ("device_mismatch", 4, r"Cannot re-initialize CUDA in forked subprocess"),
    ("device_mismatch", 4, r"MPS backend|mps:0|The operator '[\w:.]+' is not currently implemented for the MPS device"),
    ("device_mismatch", 4, r"cuda runtime error|CUDA error:"),
    ("device_mismatch", 3, r"(on|to) (the )?(wrong|different) device|cuda:\d and cpu|cpu and cuda:\d"),
    ("device_mismatch", 3, r"map_location|validate_cuda_device|_cuda_deserialize"),
    ("device_mismatch", 3, r"\bgpus? (is |are )?not (available|found|detected)|no GPU (found|available|detected)"),
    ("device_mismatch", 3, r"docker: Error response from daemon" + _G + r"(gpu|nvidia)"),
    # ---- shape_mismatch -----------------------------------------------------------------
    ("shape_mismatch", 6, r"The size of tensor a \(\d+\) must match the size of tensor b \(\d+\)"),
    ("shape_mismatch", 6, r"mat1 and mat2 shapes cannot be multiplied"),
    ("shape_mismatch", 6, r"Sizes of tensors must match except in dimension"),
    ("shape_mismatch", 6, r"stack expects each tensor to be equal size|expects each tensor to be equal size"),
    ("shape_mismatch", 6, r"expected input\[[\d, ]+\] to have \d+ channels, but got \d+ channels"),
    ("shape_mismatch", 6, r"Expected \d+D \(unbatched\) or \d+D \(batched\) input|Expected \d+-dimensional input for \d+-dimensional weight"),
    ("shape_mismatch", 6, r"operands could not be broadcast together with shapes"),
    ("shape_mismatch", 5, r"Wrong input shape height=\d+, width=\d+|divisible by \d+"),
    ("shape_mismatch", 5, r"shape '\[[-\d, ]+\]' is invalid for input of size \d+"),
    ("shape_mismatch", 5, r"\bexpected (a )?\d-?D (tensor|input)|\bgot (a )?\d-?D (tensor|input)"),
    ("shape_mismatch", 5, r"(must|should) have the same number of elements|number of elements[^\n]{0,40}(does not|doesn't|must) match"),
    ("shape_mismatch", 5, r"(requires?|expects?|expected) (inputs|tensors|arrays) (with|of|to have) (matching|the same|equal) (shapes?|sizes?)"),
    ("shape_mismatch", 6, r"expanded size of the tensor \(\d+\) must match the existing size|target size[^\n]{0,60}different (to|from) the input size"),
    ("shape_mismatch", 5, r"Expected more than 1 value per channel|number of dims don't match|tensors must have same number of dimensions|negative dimensions are not allowed|view size is not compatible with input tensor"),
    ("shape_mismatch", 5, r"(Target|target) size \(torch\.Size\(\[[\d, ]+\]\)\) must be the same as input size"),
    ("shape_mismatch", 5, r"shapes? \(?[\d, ]+\)? (and|vs\.?) \(?[\d, ]+\)? (not aligned|mismatch|are incompatible)"),
    ("shape_mismatch", 5, r"size mismatch, (m1|mat1)"),
    ("shape_mismatch", 5, r"Given groups=\d+, (expected )?weight of size"),
    ("shape_mismatch", 5, r"(cannot|can not|could not) (reshape|broadcast) (array|input array)"),
    ("shape_mismatch", 5, r"doesn't match the broadcast shape|does not match the broadcast shape"),
    ("shape_mismatch", 5, r"(height|width|shapes?|sizes?|dimensions?)" + _G + r"(should|must) (be equal|be the same|match)"),
    ("shape_mismatch", 5, r"all the input array dimensions (except for the concatenation axis )?must match"),
    ("shape_mismatch", 4, r"Expected (input )?batch_size \(\d+\) to match target batch_size \(\d+\)"),
    ("shape_mismatch", 4, r"Input and output sizes should be greater than 0|Output size is too small|Calculated padded input size per channel"),
    ("shape_mismatch", 4, r"Kernel size can't be greater than actual input size|input image is smaller than kernel"),
    ("shape_mismatch", 4, r"(only|Only) batches of spatial targets supported|Expected input (batch_size|to have)"),
    ("shape_mismatch", 4, r"dimension out of range|Dimension out of range|too many indices for (tensor|array)"),
    ("shape_mismatch", 4, r"(non-singleton|singleton) dimension|size mismatch|shape mismatch|Shape mismatch|shapes mismatch"),
    ("shape_mismatch", 4, r"inconsistent (tensor|array) (size|shape)|must have the same (shape|size)|expected (shape|size) \(?[\d, ]+"),
    ("shape_mismatch", 3, r"index \d+ is out of bounds for (dimension|axis) \d+ with size \d+"),
    ("shape_mismatch", 3, r"Assertion `t >= 0 && t < n_classes` failed|Target -?\d+ is out of bounds"),
    ("shape_mismatch", 3, r"too many values to unpack \(expected \d\)"),
    ("shape_mismatch", 3, r"torch\.Size\(\[[\d, ]+\]\)" + _G + r"torch\.Size\(\[[\d, ]+\]\)"),
    # ---- dtype_mismatch -----------------------------------------------------------------
    ("dtype_mismatch", 6, r"expected scalar type \w+ but found \w+"),
    ("dtype_mismatch", 5, r"tensors used as indices must be long"),
    ("dtype_mismatch", 5, r"Input type \([\w:. ]+\) and (weight|bias) type \([\w:. ]+\) should be the same|should be a (float|floating point|integer|long|double) tensor|Got torch\.(uint8|int64|float64|float16)\b"),
    ("dtype_mismatch", 6.5, r"data type = \d+ is not supported|supports only CV_8UC1|only supports CV_8UC1"),
    ("dtype_mismatch", 6, r"Cannot handle this data type"),
    ("dtype_mismatch", 4, r"_fromarray_typemap|\btypestr\b"),
    ("dtype_mismatch", 6, r"Input type \(torch\.cuda\.(Half|Float|Double|BFloat16)Tensor\) and weight type \(torch\.cuda\.(Half|Float|Double|BFloat16)Tensor\)"),
    ("dtype_mismatch", 6, r"Input type \((Half|Float|Double|BFloat16|float|double|half|c10::Half|c10::BFloat16)\) and (weight|bias) type \((Half|Float|Double|BFloat16|float|double|half|c10::Half|c10::BFloat16)\)"),
    ("dtype_mismatch", 6, r"Input type \(torch\.(Half|Float|Double|BFloat16|Byte|Long)Tensor\) and weight type \(torch\.(Half|Float|Double|BFloat16)Tensor\)"),
    ("dtype_mismatch", 6, r"(mat1|self|input|weight|tensors?) and (mat2|other|weight|bias) (must|to) have the same dtype|Cannot interpret '[\w.]+' as a data type|did not contain a loop with signature matching types"),
    ("dtype_mismatch", 6, r"Expected (object|tensor) of scalar type \w+ but got scalar type \w+"),
    ("dtype_mismatch", 6, r"\"\w+\" not implemented for '(Half|Byte|Long|Int|Bool|Char|Float|Double|BFloat16|ComplexFloat)'"),
    ("dtype_mismatch", 6, r"result type \w+ can't be cast to the desired output type \w+"),
    ("dtype_mismatch", 6, r"Cannot cast ufunc '\w+' output from dtype"),
    ("dtype_mismatch", 5, r"Unsupported depth of input image|Unsupported (data )?type|depth' is \d+ \(CV_\d+[FSU]\)"),
    ("dtype_mismatch", 5, r"(only supports|supports only) CV_8UC1|CV_8UC1 images|unsupported (image )?depth"),
    ("dtype_mismatch", 5, r"can't convert (np\.ndarray|numpy\.\w+) of type numpy\.(object_|uint16|bool_)"),
    ("dtype_mismatch", 5, r"(Cannot|can't|could not) (handle|convert) this data type|TypeError: Cannot handle this data type"),
    ("dtype_mismatch", 5, r"Image data of dtype \w+ cannot be converted to float"),
    ("dtype_mismatch", 5, r"(Found|found) dtype \w+ but expected \w+|expected dtype \w+|dtype mismatch|dtypes? (do not|don't) match"),
    ("dtype_mismatch", 5, r"Expected (floating point|integral|boolean) type"),
    ("dtype_mismatch", 4, r"only (integer|floating point|boolean) tensors|Tensor(s)? of type \w+ (is|are) not supported"),
    ("dtype_mismatch", 4, r"is not implemented for (type|dtype)|not supported for (dtype|type) (torch|np)\.\w+"),
    ("dtype_mismatch", 4, r"(uint16|float64|int64|uint8|float16|bfloat16)" + _G + r"(not supported|unsupported|cannot be|can't be)"),
    ("dtype_mismatch", 3, r"\bdtype\b"),
    # ---- image_format -------------------------------------------------------------------
    ("image_format", 6, r"cannot identify image file|UnidentifiedImageError"),
    ("image_format", 6, r"image file is truncated|Truncated File Read|premature end of (JPEG|data)"),
    ("image_format", 6, r"DecompressionBombError|DecompressionBombWarning|exceeds limit of \d+ pixels"),
    ("image_format", 6, r"TiffFileError|not a (valid )?TIFF file|invalid TIFF"),
    ("image_format", 5, r"\b(TiffFrame|TiffPage|TiffTag|OME series)\b|missing required tags"),
    ("image_format", 5, r"wrong mode|bad mode|unrecognized (image )?mode|(encoder|decoder) error -?\d+|can ?not handle images with \d+-bit samples|TIFFRGBAImageOK"),
    ("image_format", 5, r"Read error on strip|TIFF\w{1,100}: |cannot decompress \w+|failed to read \d+ bytes|not a valid (PNG|JPEG|image)"),
    ("image_format", 5, r"Could not find a backend to open|Could not find a format to read|No plugin found|cannot find a (reader|plugin)|format not supported"),
    ("image_format", 5, r"cannot write mode \w+ as \w+|mode \w+ (is not|not) supported|conversion from [\w;]+ to [\w;]+ not supported"),
    ("image_format", 5.5, r"s?size\.width\s?>\s?0 && s?size\.height\s?>\s?0|src\.size\(\)\.width|(?:!|\b)s?size\.empty\(\)"),
    ("image_format", 6, r"not a recognised image \(PNG, JPEG"),  # mb.read_image's own refusal, whatever the file is
    ("image_format", 5, r"VScn::contains\(scn\)|Invalid number of channels in input image|!_src\.empty\(\)|!ssize\.empty\(\)|_src\.empty\(\)|!_img\.empty\(\)|\(-215(:Assertion failed)?\)" + _G + r"empty"),
    ("image_format", 5, r"'NoneType' object has no attribute '(shape|copy|astype|ndim|size)'"),
    ("image_format", 5, r"can't open/read file|imread_\(|Corrupt JPEG data|libpng (error|warning)|Not a JPEG file|IHDR|iCCP: known incorrect sRGB"),
    ("image_format", 5, r"broken data stream when reading image file|image file could not be (read|opened|decoded)|Could not (read|decode|open) (the )?image"),
    ("image_format", 5, r"unsupported image (file|type)\b|(unsupported|invalid|unknown) (image )?(file )?(format|extension)(?! or combination)|file (type|extension) (not allowed|is not supported|not supported)"),
    ("image_format", 5, r"(No such file|does not exist|not found|cannot find)" + _G + r"\.(png|jpe?g|tiff?|bmp|gif|webp)\b"),
    ("image_format", 5, r"\.(png|jpe?g|tiff?|bmp|gif|webp)['\"]?" + _G + r"(No such file|does not exist|not found)"),
    ("image_format", 4, r"images? (must|should) (be|have) (RGB|grayscale|3 channels|\d+ channels)|(grayscale|RGBA|CMYK|palette|16-bit|12-bit) (image|input)"),
    ("image_format", 4, r"(RGBA|CMYK|palette|multi-?page|16-?bit|I;16|float) image|mode ['\"]?(I;16|I;16B|RGBA|CMYK|P|LA|F)['\"]?"),
    ("image_format", 4, r"imagecodecs|compression scheme|COMPRESSION\.\w+|decoder \w+ not available|encoder \w+ not available"),
    ("image_format", 4, r"EXIF|exif_transpose|orientation"),
    ("image_format", 3, r"PIL\.Image|Image\.open|cv2\.imread|imageio|skimage\.io|tifffile"),
    # ---- normalization ------------------------------------------------------------------
    ("normalization", 6, r"Clipping input data to the valid range for imshow"),
    ("normalization", 6, r"Images of type float must be between -?\d and \d|Floating point image RGB values must be in the 0\.\.1 range"),
    ("normalization", 5, r"Lossy conversion from \w+ to \w+|Possible precision loss|Possible sign loss"),
    ("normalization", 5, r"(mean|std) (and|or) (std|mean)|std evaluated to zero|(mean|std) must have (the same|\d+)"),
    ("normalization", 5, r"\bnormaliz(e|ation|ed)\b|\bnormalis(e|ation|ed)\b|ImageNet (mean|statistics)"),
    ("normalization", 5, r"(completely|all|entirely) (white|black|empty|blank|background)|outside the range|intensity scaling|not normali[sz]ed|(empty|blank|black|white|all[- ]zeros?|all[- ]black|no) (masks?|predictions?|outputs?|segmentation)|(mask|prediction|output) (is|was|are) (empty|blank|all zeros?|black)"),
    ("normalization", 4, r"(values?|pixels?|intensit(y|ies)|input) (are |is )?(clipped|saturat(ed|e)|out of range)|clip(ped|s)? at 255"),
    ("normalization", 5, r"\b(masks?|predictions?|predicted|outputs?|results?|segmentations?)\b[^\n]{0,80}?\b(all|only|entirely|completely)\b[^\n]{0,40}?\b(black|zeros?|zero values|empty|blank|background)\b"),
    ("normalization", 4, r"(range|scale) \[?0(\.0)?,? ?(1|255|65535)\]?|/ ?255\b|divide(d)? by 255"),
    ("normalization", 4, r"(low|poor|zero|bad) (IoU|dice|accuracy)|IoU (is |of )?0(\.0+)?\b|predicts? (nothing|only background|all background)"),
    ("normalization", 3, r"(input|image) (statistics|distribution|histogram)|contrast|brightness|bit depth"),
    # ---- nan_output ---------------------------------------------------------------------
    ("nan_output", 6, r"returned nan values in its \d+th output|Function '\w+' returned nan"),
    ("nan_output", 6, r"NaN or Inf|Inf or NaN|NaN/Inf|non-finite|nonfinite|not finite"),
    ("nan_output", 6, r"Input contains (NaN|infinity)|contains NaN|contains (inf|infinite) values?"),
    ("nan_output", 6, r"(loss|output|outputs|logits|predictions?|probabilit(y|ies)|tensor|weights?) (is|are|became|becomes|contains?|returned|gives?|produces?) (nan|NaN|inf)"),
    ("nan_output", 6, r"\b(nan|NaN) (loss|values?|outputs?|detected|encountered|in (the )?(output|logits|loss))"),
    ("nan_output", 5, r"invalid value encountered in|divide by zero encountered|overflow encountered in"),
    ("nan_output", 5, r"All-NaN (slice|axis) encountered|Mean of empty slice"),
    ("nan_output", 6, r"Assertion `input_val >= zero && input_val <= one` failed|all elements of input should be between 0 and 1"),
    ("nan_output", 5, r"detect_anomaly|anomaly detection|isfinite|torch\.isnan|np\.isnan"),
    ("nan_output", 4, r"\bloss: nan\b|\bloss=nan\b|tensor\(nan|\[nan, nan|\bnan\b,? ?\bnan\b"),
    ("nan_output", 3, r"fp16 overflow|Gradient overflow|loss scale|GradScaler"),
    ("nan_output", 5, r"\b(detected|found|encountered|got|produced?s?) (a |an )?(nan|inf)\b|\bdiff: nan\b"),
    # ---- postprocessing -----------------------------------------------------------------
    ("postprocessing", 6, r"find_contours|findContours|drawContours|approxPolyDP|contourArea"
     r"|in function '?(cv::)?(convexHull|convexityDefects|arcLength|moments|boundingRect|minAreaRect|fitEllipse\w*)"),
    ("postprocessing", 6, r"\bLinearRing\b|LinearRing must have at least \d+ coordinate|TopologyException|Invalid polygon|self-intersection|is_valid"),
    ("postprocessing", 5, r"\bpolygons?\b|\bcontours?\b|\bshapely\b|pycocotools|frPyObjects|(?-i:\bRLE\b)|mask_to_polygons"),
    ("postprocessing", 5, r"No polygons detected|zero polygons|no contours (found|detected)"),
    ("postprocessing", 4, r"\bthreshold(ing|ed)?\b|binariz|\bholes?\b|parent_id|hierarchy|RETR_(TREE|EXTERNAL|CCOMP|LIST)"),
    ("postprocessing", 3, r"connected components|watershed|label\(|regionprops|min_area|argmax"),
    # ---- validation_error ---------------------------------------------------------------
    ("validation_error", 6, r"(?<!\d)\d+ validation errors? for \w+"),
    ("validation_error", 6, r"\"detail\": ?\[ ?\{|'detail': ?\[ ?\{|\"loc\": ?\[|'loc': ?\("),
    ("validation_error", 6, _http(422, "Unprocessable") + r"|Unprocessable (Entity|Content)"),
    ("validation_error", 6, _http(413, "Request|Payload|Content") + r"|Request Entity Too Large|Payload Too Large|Content Too Large|client intended to send too large body|LimitRequestBody|max_body_size|MaxBodySize"),
    ("validation_error", 5, r"type=value_error(\.\w+)?|type=type_error(\.\w+)?|\[type=\w+, input_value=|\"type\": ?\"(missing|\w+_type|value_error|\w+_parsing|less_than\w*|greater_than\w*)\""),
    ("validation_error", 5, r"field required|Field required|value is not a valid \w+|Input should be (a valid|less|greater|at)|extra fields not permitted|Extra inputs are not permitted"),
    ("validation_error", 5, r"RequestValidationError|ValidationError|pydantic_core|pydantic\.error_wrappers"),
    ("validation_error", 5, r"Invalid HTTP request|invalid (request|form|multipart) (body|data)"),
    ("validation_error", 5, _http(400, "Bad") + r"|Bad Request"),
    ("validation_error", 4, r"ensure this value is (less|greater)|(less|greater) than or equal to|must be (between|one of|in range)|not a valid (enumeration|integer|float|boolean)"),
    ("validation_error", 4, r"Did not find boundary character|boundary character|There was an error parsing the body|Missing boundary in multipart"),
    ("validation_error", 5, r"\"type\": ?\"(json_invalid|extra_forbidden|value_error)\"|JSON decode error|Expected UploadFile"),
    ("validation_error", 4, r"Unsupported Media Type|Method Not Allowed"),
    ("validation_error", 3, r"(invalid|bad|wrong) (parameter|argument|request|value|input|payload|field)"),
    # ---- queue_timeout ------------------------------------------------------------------
    ("queue_timeout", 6, _http(504, "Gateway") + r"|Gateway Time-?out|upstream timed out|upstream request timeout"),
    ("queue_timeout", 6, _http(429, "Too") + r"|Too Many Requests|rate limit(ed)?|Rate limit exceeded|RateLimitError"),
    ("queue_timeout", 6, _http(503, "Service") + r"|Service (Temporarily )?Unavailable|no healthy upstream|upstream connect error"),
    ("queue_timeout", 6, r"WORKER TIMEOUT|SoftTimeLimitExceeded|TimeLimitExceeded|(Hard|Soft) time limit \(\d+"),
    ("queue_timeout", 5, r"Exceeded concurrency limit|CircuitBreakerError|circuit (breaker )?(is )?open|breaker (is )?open"),
    ("queue_timeout", 5, r"ReadTimeout|ConnectTimeout|PoolTimeout|WriteTimeout|TimeoutException|Read timed out|Connection timed out|timed out|\btime ?out\b|TimeoutError|DeadlineExceeded|deadline exceeded"),
    ("queue_timeout", 5, _http(502, "Bad") + r"|Bad Gateway|upstream prematurely closed|Connection reset by peer|RemoteDisconnected|Server disconnected"),
    ("queue_timeout", 5, r"is currently loading|\"estimated_time\": ?\d"),
    ("queue_timeout", 5, r"queue (is )?full|QueueFull|queue\.Full|overloaded(?! or there is an error in the application)|server is busy|too many (pending|concurrent) (requests|tasks|jobs)"),
    ("queue_timeout", 4, r"backlog|too many (pending|concurrent)|backpressure|max(imum)? concurrency"),
    ("queue_timeout", 5, r"StatusCode\.UNAVAILABLE|failed to connect to all addresses"),  # gRPC (Triton, TF Serving)
    ("queue_timeout", 4, r"Connection refused|Failed to establish a new connection|Max retries exceeded|Cannot connect to (redis|amqp)|ConnectionError|Error \d+ connecting to"),
    ("queue_timeout", 4, r"kombu\.exceptions|OperationalError" + _G + r"(redis|amqp|broker)|broker connection|heartbeat"),
    ("queue_timeout", 3, r"Waiting for (application|background tasks|connections) to close|Shutting down|health check (failed|timed out)"),
    ("queue_timeout", 3, r"Watchdog caught collective operation timeout|Timeout\(ms\)=\d+"),
    # ---- missing_dependency -------------------------------------------------------------
    ("missing_dependency", 6, r"No module named ['\"]?[\w.]+"),
    ("missing_dependency", 6, r"ModuleNotFoundError"),
    ("missing_dependency", 6, r"cannot import name ['\"]?\w+['\"]? from"),
    ("missing_dependency", 6, r"(?<![\w.+-])[\w.+-]+\.so(\.[\d.]+)?: cannot open shared object file"),  # from a name's start only
    ("missing_dependency", 6, r"compiled using NumPy 1\.x cannot be run in|numpy\.(_?core)\.multiarray failed to import|multiarray numpy extension module failed|compiled against API version|was removed in (the )?NumPy 2|_ARRAY_API not found|numpy\.dtype size changed, may indicate binary incompatibility"),
    ("missing_dependency", 6, r"undefined symbol: \w+|DLL load failed|ImportError: DLL|symbol not found in flat namespace|Library not loaded"),
    ("missing_dependency", 5, r"operator \w+::\w+ does not exist|No such operator \w+::\w+|Couldn't load custom C\+\+ ops"
     r"|No operator found for"),
    ("missing_dependency", 5, r"not compiled with lib\w+ support|Failed to load the native TensorFlow runtime"),
    ("missing_dependency", 5.5, r"is not in the [\w:]+ registry"),
    ("missing_dependency", 5.5, r"LoadLibrary failed with error \d+|Failed to create (CUDA|TensorRT)ExecutionProvider"
     r"|onnxruntime_providers_\w+\.(dll|so)"),  # ONNX Runtime's GPU provider
    ("missing_dependency", 5.5, r"java\.lang\.(NoSuchMethodError|NoClassDefFoundError|UnsatisfiedLinkError|ClassNotFoundException)"
     r"|ai\.djl\.engine\.EngineException|Error loading a Deep Learning engine|Failed to load \w+ native library"),
    ("missing_dependency", 5.5, r"Version tag does not match|Engine deserialization failed|serialized engine" + _G
     + r"(version|incompatible)"),  # a TensorRT engine built elsewhere  # OpenMMLab: the module that registers it was not imported
    ("missing_dependency", 6, r"requires the 'imagecodecs' package"),  # a bare 'cannot decompress LZW' stays image_format
    ("missing_dependency", 5, r"specified module could not be found|Error loading \"[^\"\n]{1,200}\.dll\"|or one of its dependencies|Could not import module"),
    ("missing_dependency", 5, r"\b(sh|bash|zsh)(: \d+)?: [\w.-]+: (command )?not found|GLIBC\w*_[\d.]+' not found"),
    ("missing_dependency", 6, r"requires the ['\"]?\w+['\"]? (package|library|module)|requires ['\"]?[\w-]+['\"]? to be installed|to be installed\.? ?(pip|run|Please)"),
    ("missing_dependency", 3.5, r"(please|Please) (pip )?install|pip install|conda install|apt(-get)? install"),
    ("missing_dependency", 5, r"module ['\"]?[\w.]+['\"]? has no attribute ['\"]?(float|int|bool|object|str|long|complex|ANTIALIAS|LINEAR|BICUBIC|typeDict|asscalar|product)\b"),
    ("missing_dependency", 5, r"ImportError|is not installed|not installed|could not be imported|failed to import|cannot be imported|no module"),
    ("missing_dependency", 5, r"Numpy is not available|NumPy was built with baseline|incompatible (version|versions) of|version conflict|requires [\w-]+\s?[<>=!~]=?\s?[\d.]+, but you have"),
    ("missing_dependency", 4, r"(package|dependency|library|extra) (is )?(missing|not found|required)|Form data requires|python-multipart"),
    ("missing_dependency", 4, r"Unknown model \(|Unknown encoder|Wrong encoder name|is not a registered model|not (in|among) (the )?(supported|available) (encoders|models)"),
    ("missing_dependency", 4, r"command not found|executable (file )?not found in \$?PATH|not found in PATH|no such file or directory: '?(nvcc|ninja|gcc|cmake)"),
    ("missing_dependency", 4, r"Could not build wheels|Failed building wheel|error: subprocess-exited-with-error|ResolutionImpossible|No matching distribution found"),
    ("missing_dependency", 3, r"AttributeError: module ['\"][\w.]+['\"] has no attribute"),
    ("missing_dependency", 3, r"deprecated and (was )?removed|has been removed in"),
)

# Weak hints: they decide only when no rule above fires (weight 1.5 at most).
WEAK_RULES: tuple[tuple[str, float, str], ...] = (
    ("cuda_oom", 1.5, r"\bmemory\b|\ballocat|\bOOM\b|\bRAM\b|VRAM"),
    ("weights_missing", 1.2, r"\bdownload|\.pth\b|\.ckpt\b|\.safetensors\b|\bpickle|\bzip\b|\barchive\b"),
    ("weights_mismatch", 1.4, r"checkpoint|state_dict|pretrained|\bweights?\b"),
    ("device_mismatch", 1.4, r"\bcuda\b|\bgpu\b|\bdevice\b|\bdriver\b|nvidia|\bcpu\b|\bdaemon\b|\bcontainer\b|\bnvml\b|\bruntime\b"),
    ("shape_mismatch", 1.4, r"\bshapes?\b|\bsizes?\b|\bdimensions?\b|\bchannels?\b|broadcast|\baxis\b|\b[1-6]D\b|\bndim\b|nelement"),
    ("dtype_mismatch", 1.4, r"\bdtype|\bfloat(16|32|64)?\b|\bdouble\b|\bhalf\b|u?int(8|16|32|64)\b|scalar type"),
    ("image_format", 1.3, r"\bimages?\b|\bjpe?g\b|\bpng\b|\btiff?\b|\bpixels?\b|\bdecod|cvtColor|imshow|imread|\bresize\b|NoneType"),
    ("normalization", 1.3, r"normali|\bmean\b|\bstd\b|\bintensit|\bscal(e|ing)\b"),
    ("nan_output", 1.5, r"\bnan\b|\binf\b|overflow"),
    ("postprocessing", 1.3, r"\bmasks?\b|threshold|polygon|contour"),
    ("validation_error", 1.3, r"\binvalid\b|\brequired\b|\bfield\b|\bschema\b|\b4\d\d\b|\bpydantic\b"),
    ("queue_timeout", 1.3, r"\btime|\bbusy\b|\bslow\b|\bqueue|\bworker|\bretry|\bhang"),
    ("missing_dependency", 1.4, r"\bimport|(?<!<)\bmodule\b(?!>)|\bpackage\b|\bversion\b|\binstall|\blibrary\b"),
)

# Classes that are usually a consequence of something else: listed after other diagnoses.
CONSEQUENCE_CLASSES = frozenset({"queue_timeout"})

# Per class: (title, what it means, the fix, the notebook that walks through it).
CLASS_INFO: dict[str, tuple[str, str, str, str]] = {
    "cuda_oom": ("out of memory", "the process asked for more GPU or CPU memory than was free",
                 "lower the input size or batch, run tiled (mb.predict_tiled), use half precision on GPU, or move to a "
                 "device with more memory; check the need first with mb.estimate_memory / mb.max_input_size",
                 "01_out_of_memory.ipynb"),
    "weights_missing": ("weights missing or damaged", "the weights file is absent, empty, truncated, an LFS pointer or an HTML page",
                        "restore the file (git lfs pull, re-download, check the path and working directory) and verify "
                        "its sha256; mb.check_weights(path) says which", "02_weights.ipynb"),
    "weights_mismatch": ("weights do not fit the model", "the checkpoint's keys, shapes or pickled globals do not match the model",
                         "load with strict=True and read the key report (mb.check_weights(path, model)); strip a 'module.' "
                         "prefix, build the architecture/width the checkpoint was trained with, or allow the listed "
                         "globals with torch.serialization.safe_globals", "02_weights.ipynb"),
    "device_mismatch": ("device or driver problem", "tensors live on different devices, or CUDA / the driver / the container runtime is unusable",
                        "move model and inputs to the same device (model.to(device), x.to(device)), load checkpoints with "
                        "map_location, and check the driver and CUDA build with `mlbench doctor`", "09_dependencies_and_devices.ipynb"),
    "shape_mismatch": ("shape mismatch", "an array or tensor has a size the next operation cannot take",
                       "check the input size against the model (multiples of 16/32, 3 channels, a batch axis); pad or "
                       "resize, and trace shapes with mb.trace_shapes(model, x)", "04_shape_and_dtype.ipynb"),
    "dtype_mismatch": ("dtype mismatch", "two operands or an image have data types the operation does not accept",
                       "convert explicitly (x.float(), x.to(model.dtype), image.astype(np.float32) / max) before the call",
                       "04_shape_and_dtype.ipynb"),
    "image_format": ("image format problem", "the image could not be read, or was read with the wrong mode, depth, channels or pages",
                     "read with mb.read_image (keeps 16-bit, drops alpha, checks pixels) and inspect with mb.check_image(path)",
                     "03_image_formats.ipynb"),
    "normalization": ("normalisation problem", "pixel values reach the model in a different range or statistics than in training",
                      "scale by the real bit depth and apply the training mean/std (preset='fixed'); compare input "
                      "statistics with the manifest's", "05_normalization.ipynb"),
    "nan_output": ("NaN or infinite values", "a computation produced NaN or inf (overflow, division by zero, bad input or weights)",
                   "find the first stage with non-finite values (torch.isfinite per stage, autograd.detect_anomaly in "
                   "training), check input scaling and fp16 overflow", "05_normalization.ipynb"),
    "postprocessing": ("post-processing problem", "thresholding, contours or polygons went wrong after the model",
                       "check the probability range and threshold, the mask dtype (uint8 for findContours), the contour "
                       "mode (holes) and min_area", "06_postprocessing.ipynb"),
    "validation_error": ("request validation error", "the request did not match what the API accepts (fields, types, ranges, size)",
                         "send the fields the API expects (multipart `file`, `model`, threshold 0.1..0.9) and keep uploads "
                         "under the size limit; read the `detail` list for the field", "07_service_validation.ipynb"),
    "queue_timeout": ("timeout or overload", "the service was too slow or too busy to answer (timeout, 429/503/504, worker killed by timeout)",
                      "bound the work (queue with a limit, timeout inside the worker, smaller inputs or a faster model) and "
                      "let clients retry with backoff", "08_queue_timeouts.ipynb"),
    "missing_dependency": ("missing or broken dependency", "a Python package or native library is missing, too old/new, or built against another ABI",
                           "install the named package at a compatible version into the same environment (pip install ...) "
                           "and check all imports with `mlbench doctor`", "09_dependencies_and_devices.ipynb"),
    "unknown": ("unknown", "no known failure pattern was found", "read the full traceback; reproduce with mb.Pipeline(...).start(image) "
                "and step through the stages", "11_postmortem.ipynb"),
}

# Import name -> the pip package that provides it.
PIP_NAMES: dict[str, str] = {
    "cv2": "opencv-python-headless", "PIL": "pillow", "skimage": "scikit-image", "sklearn": "scikit-learn",
    "yaml": "pyyaml", "pynvml": "nvidia-ml-py", "multipart": "python-multipart", "safetensors": "safetensors",
    "segmentation_models_pytorch": "segmentation-models-pytorch", "albumentations": "albumentations",
    "tifffile": "tifffile", "imagecodecs": "imagecodecs", "torchvision": "torchvision", "timm": "timm",
    "jpype": "JPype1",
}
