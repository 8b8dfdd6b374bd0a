"""Known causes within a failure class: the fix for the cause the error text names.

A class's fix (:data:`mlbench.failures.rules.CLASS_INFO`) is written for its most common cause;
several texts of one class name a different one, whose fix the class's would get wrong: a
``Connection refused`` is a timeout-or-overload diagnosis, but nothing is listening, so bounding
the work does not help; a ``device-side assert`` is a device problem whose traceback points at
the wrong line. :func:`find_cause` returns the first cause of the diagnosed class whose pattern
the error block holds; :func:`mlbench.triage` puts its name in ``numbers["cause"]`` and its fix in
``fix`` (a fix built from the text's own numbers, naming the package or prefix, still comes
first). The patterns are alternations of literals (a blank run bounded to one line at most): linear on any input.
"""

from __future__ import annotations

import re

__all__ = ["CAUSES", "cause_meaning", "find_cause"]

CAUSES: tuple[tuple[str | tuple[str, ...], str, str, str], ...] = (
    # (failure class or classes, cause, pattern, fix); the first match of the class wins
    ("cuda_oom", "file_descriptors", r"Too many open files|received \d+ items of ancdata",
     "the process ran out of file descriptors passing tensors between DataLoader workers, not out of memory: call "
     "torch.multiprocessing.set_sharing_strategy('file_system') or raise the limit (ulimit -n 65536)"),
    ("cuda_oom", "shared_memory", r"/dev/shm|\(shm\)|shared memory|</torch_|unable to write to file </",
     "shared memory (/dev/shm) is too small for the batches that DataLoader workers pass through it: raise it (docker "
     "run --shm-size=2g or --ipc=host; in Kubernetes mount an emptyDir with medium: Memory at /dev/shm), or use "
     "num_workers=0"),
    ("cuda_oom", "killed_by_host", r"OOMKilled(?![\"':\s]{0,3}false)|oom-kill|oom_reaper|Out of memory: Kill|exit ?code\W{0,3}137"
     r"|Exited \(137\)|exit status 137|signal 9|SIGKILL|killed by signal: Killed|^[^\S\n]*Killed[^\S\n]*$",
     "the process was killed with SIGKILL (exit code 137), almost always by the kernel's OOM killer because host "
     "RAM or the container's memory limit ran out, not the GPU (dmesg | grep -i oom, or docker inspect --format "
     "'{{.State.OOMKilled}}', confirms it): "
     "raise the memory limit, lower the batch, the input size or the number of workers, and check the need with "
     "mb.estimate_memory(model, input_shape, device='cpu')"),
    ("cuda_oom", "windows_paging_file", r"WinError 1455|paging file is too small|页面文件太小"
     r"|fichier de pagination est insuffisant|Файл подкачки слишком мал",
     "Windows ran out of virtual memory (its paging file) while loading torch's CUDA DLLs, not GPU memory: raise "
     "the paging file (System > Advanced system settings > Performance > Virtual memory, or let Windows manage it "
     "on a drive with free space) and lower num_workers, since every DataLoader worker loads the DLLs again"),
    ("weights_missing", "not_a_torch_archive", r"locating file data\.pkl",
     "the file is a zip archive but not one torch.save wrote (another tool's archive, or damaged): "
     "mb.check_weights(path) says what it holds; fetch the checkpoint the model was saved to"),
    ("nan_output", "nonfinite_weights", r"tensor\(s\) hold NaN|NaN (or Inf )?in (the )?(weights|checkpoint|state dict)"
     r"|(weights|checkpoint|parameters) (contain|hold|have) (NaN|nan|inf)",
     "the weights themselves hold NaN or Inf (the training diverged): load an earlier checkpoint; "
     "mb.check_weights(path) lists the tensors"),
    ("image_format", "save_mode", r"cannot write mode \w+ as|RAWMODE\[im\.mode\]",
     "the format cannot store this mode (JPEG has no alpha and no 16-bit): convert before saving "
     "(image.convert('RGB').save(path)) or save as PNG or TIFF"),
    (("image_format", "missing_dependency"), "tiff_codec", r"cannot decompress (LZW|JPEG|ZSTD|LZMA|JPEGXL|WEBP|DEFLATE)"
     r"|requires the 'imagecodecs' package|imagecodecs",
     "the TIFF is compressed with a codec tifffile needs imagecodecs for: pip install imagecodecs (mb.read_image "
     "reads such files once it is installed)"),
    ("image_format", "other_kind_of_file", r"not a recognised image \(PNG, JPEG, TIFF, BMP, GIF, WebP\); it is ",
     "the file is another kind of file, which the message names: convert it as the message says, then check the "
     "result with mb.check_image(path)"),
    ("weights_mismatch", "wrapped_checkpoint", r'Unexpected key\(s\) in state_dict: "(state_dict|model_state_dict|model|net'
     r'|network|params|ema|state|weights|optimizer|epoch|model_ema)"',
     "the file is a training checkpoint whose weights sit under a key (the unexpected keys name it): load "
     "ckpt = torch.load(path, map_location='cpu') and pass ckpt['state_dict'] (or ckpt['model']) to "
     "model.load_state_dict; mb.check_weights(path, model) finds the key"),
    ("weights_mismatch", "torchscript_archive", r"TorchScript archive|torch\.jit\.save\b|with TorchScript",
     "the file is a TorchScript archive (torch.jit.save), not a state dict: if you trust it, save its weights with "
     "torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'weights.pth') and load those"),
    ("weights_mismatch", "not_torchscript", r"locating file constants\.pkl",
     "torch.jit.load was given a torch.save checkpoint (a state_dict or a pickled model), not TorchScript: load it "
     "with torch.load(path, map_location='cpu') or mb.check_weights(path), or export TorchScript with "
     "torch.jit.script(model).save(path)"),
    ("device_mismatch", "cpu_only_torch", r"not compiled with CUDA|not compiled with cuda support",
     "this torch is a CPU-only build: run on the CPU (device='cpu', torch.load(..., map_location='cpu')), or install "
     "a CUDA build of torch for the GPU (the command at pytorch.org/get-started for your CUDA), then `mlbench doctor`"),
    ("device_mismatch", "no_gpu_driver", r"Found no NVIDIA driver|no CUDA-capable device is detected|NVIDIA-SMI has failed"
     r"|could not select device driver",
     "this process sees no NVIDIA GPU: on a Mac or with an AMD GPU there is none to use (run on device='cpu', or "
     "'mps' on Apple silicon); on Colab switch the runtime to a GPU; on a Linux host install the NVIDIA driver, in "
     "Docker run with --gpus all (the NVIDIA container toolkit); check CUDA_VISIBLE_DEVICES; `mlbench doctor` shows "
     "what is visible"),
    ("device_mismatch", "driver_too_old", r"driver on your system is too old|driver version is insufficient",
     "the NVIDIA driver is older than this torch's CUDA needs: update the driver, or install a torch built for an "
     "older CUDA (pytorch.org/get-started/previous-versions); `mlbench doctor` prints both versions"),
    ("device_mismatch", "no_kernel_for_gpu", r"no kernel image is available|is not compatible with the current PyTorch",
     "this torch build has no kernels for this GPU's architecture: install a torch build whose CUDA supports it "
     "(newer GPUs need newer CUDA builds, old ones older builds), then `mlbench doctor`"),
    ("device_mismatch", "asynchronous_kernel_error", r"device-side assert(ion)? triggered|illegal memory access|misaligned address"
     r"|illegal instruction was encountered",
     "a CUDA kernel failed asynchronously, so the traceback may point at a later line: rerun with "
     "CUDA_LAUNCH_BLOCKING=1, or the same input on the CPU, to get the real error; most often an index out of "
     "range (a class label >= the number of classes, a bad gather or embedding index)"),
    ("device_mismatch", "library_handle", r"CUDNN_STATUS_NOT_INITIALIZED|CUBLAS_STATUS_NOT_INITIALIZED|cublasCreate"
     r"|Could not create cudnn handle",
     "cuDNN/cuBLAS could not create its handle: most often the GPU was already (nearly) full when the first "
     "convolution or matmul ran (nvidia-smi shows what holds it; free it or lower the batch), else a torch build "
     "whose CUDA does not match the driver (`mlbench doctor`)"),
    ("device_mismatch", "cudnn_unsupported", r"CUDNN_STATUS_NOT_SUPPORTED|CUDNN_STATUS_BAD_PARAM",
     "cuDNN has no kernel for this call: make the input contiguous (x.contiguous()), use float32 where half "
     "precision is not supported, or split an input too large for one call (mb.predict_tiled); "
     "torch.backends.cudnn.enabled = False confirms it is cuDNN"),
    ("device_mismatch", "mps_missing_op", r"not currently implemented for the MPS device",
     "this operator has no Apple-GPU (MPS) kernel in this torch: set PYTORCH_ENABLE_MPS_FALLBACK=1 before Python "
     "starts (the operator then runs on the CPU), upgrade torch (MPS gains operators with each release), or run the "
     "model on the CPU (device='cpu')"),
    ("device_mismatch", "nccl", r"NCCL (error|WARN)|nccl(System|Internal|UnhandledCuda)Error|ncclInvalidUsage"
     r"|ProcessGroupNCCL|NCCL failure",
     "NCCL, the multi-GPU communication library, failed: rerun with NCCL_DEBUG=INFO to see why; in a container raise "
     "the shared memory (docker run --shm-size=2g or --ipc=host); without InfiniBand set NCCL_IB_DISABLE=1, and "
     "pick the network interface with NCCL_SOCKET_IFNAME; an inference on one GPU needs no torch.distributed at all"),
    ("device_mismatch", "disk_full", r"No space left on device|\[Errno 28\]|ENOSPC|disk quota exceeded"
     r"|PytorchStreamWriter failed writing|unexpected pos \d+ vs \d+",
     "a disk is full (the container's writable layer, /tmp, a cache or the output folder), not a compute device: "
     "free space (df -h shows which), or point TMPDIR and the caches at a larger volume"),
    (("device_mismatch", "dtype_mismatch"), "half_on_cpu", r"not implemented for '(Half|BFloat16)'",
     "this operation has no half-precision kernel on the CPU: run float32 there (model.float(), x.float()) and keep "
     "float16/bfloat16 for the GPU (torch.autocast)"),
    ("dtype_mismatch", "long_expected", r"scalar type Long but|expected scalar type Long|expected (a )?Long"
     r"|must be (a )?(torch\.)?LongTensor",
     "int64 (Long) was expected, most often for class-index targets (CrossEntropyLoss, NLLLoss) or indices: pass "
     "target.long() (a mask of class ids, not one-hot floats); do not convert the model's input"),
    ("dtype_mismatch", "array_to_image", r"Cannot handle this data type",
     "PIL's Image.fromarray takes uint8 (or uint16 / float32 for one channel): convert first, "
     "(np.clip(array, 0, 1) * 255).astype(np.uint8) for a float image in 0..1, and pass (H, W) or (H, W, 3)"),
    ("dtype_mismatch", "contour_mask_type", r"CV_8UC1|FindContours supports only",
     "cv2.findContours takes a single-channel uint8 mask: pass (probabilities > threshold).astype(np.uint8), not "
     "the float probabilities or a bool array"),
    ("dtype_mismatch", "index_type", r"tensors used as indices must be",
     "an index must be an integer or a boolean tensor: labels.long(), or a boolean mask such as probabilities > threshold"),
    ("dtype_mismatch", "unsigned_array", r"type numpy\.uint(16|32|64)\b",
     "torch.from_numpy cannot take this unsigned NumPy type: convert first (image.astype(np.float32) / 65535 for "
     "16-bit), or read with mb.read_image and let the pipeline scale by the image's bit depth"),
    ("shape_mismatch", "empty_array", r"zero-size array|of an empty sequence|arg is an empty sequence",
     "an array is empty, most often a mask with no foreground (no pixel above the threshold, no object found) or a "
     "crop outside the image: check before reducing (if mask.any(): ...) and find why it is empty (the probability "
     "range per stage: mb.Pipeline(...).run_until('postprocess'))"),
    ("shape_mismatch", "channels_last_input", r"expected input\[\d+, \d+, \d+, [134]\] to have [134] channels",
     "the image is channels-last (N, H, W, C): permute it to (N, C, H, W) with x.permute(0, 3, 1, 2) (NumPy: "
     "np.moveaxis(image, -1, 0) before adding the batch axis)"),
    ("shape_mismatch", "target_channels", r"Target size \(torch\.Size\(\[\d+, 3, ",
     "the target mask has 3 channels: it was read as RGB; read it as one channel (Image.open(path).convert('L') or "
     "mask[..., 0]) so it matches the model's one output channel"),
    ("shape_mismatch", "map_of_one_pixel", r"Expected more than 1 (value per channel|spatial element)",
     "a norm got a 1 x 1 map: BatchNorm in training mode with one image (call model.eval()), or an input so small "
     "that the deepest level is one pixel (use at least the model's min_input_size; pad small images)"),
    ("shape_mismatch", "input_too_small", r"Kernel size can't be greater than actual input size|Output size is too small",
     "the input is smaller than the model's downsampling allows: pad or resize it to at least the model's "
     "min_input_size (a multiple of its input_multiple)"),
    ("normalization", "display_clipping", r"Clipping input data to the valid range for imshow",
     "a warning from matplotlib, not from the model: it clips what it draws to 0..1 (floats) or 0..255 (integers), "
     "and a normalised input (mean/std) has values outside that; undo the normalisation for display "
     "(x * std + mean, then clip to 0..1) or draw one channel with a colormap"),
    ("postprocessing", "findcontours_returns", r"too many values to unpack \(expected 2\)|not enough values to unpack "
     r"\(expected 3, got 2\)",
     "cv2.findContours returns (contours, hierarchy) in OpenCV 4 but (image, contours, hierarchy) in OpenCV 3: take "
     "the last two, contours, hierarchy = cv2.findContours(mask, mode, method)[-2:], which works with both"),
    ("postprocessing", "invalid_geometry", r"TopologyException|Self-intersection|Ring Self-intersection|IllegalArgumentException"
     r"|Invalid polygon|is not valid",
     "a polygon is invalid (a self-intersecting ring, as a traced contour that touches itself makes): repair it "
     "before the geometry operation with shapely.make_valid(polygon) (or polygon.buffer(0)), drop what is empty "
     "after, and check the polygons with mb.check_polygons"),
    ("validation_error", "proxy_body_limit", r"<center>nginx|client intended to send too large body|client_max_body_size"
     r"|LimitRequestBody",
     "a proxy in front of the service (nginx: client_max_body_size, 1 MB by default; Apache: LimitRequestBody) "
     "refused the upload before the service saw it: raise the proxy's limit to at least the service's"),
    ("validation_error", "model_validation", r"(?<!\d)\d{1,5} validation errors? for (?!Request\b|Body_)[A-Za-z_]",  # not FastAPI's request models
     "a pydantic model (named after 'for') refused the values listed under it, each field with the input it got "
     "(input_value=None where a number was required): where that model is built, give each field the type it names or "
     "make it Optional where None is valid; raised inside a server on its response model, it is a server bug (an "
     "HTTP 500), not the client's request"),
    ("missing_dependency", "cuda_library", r"lib(cudnn|cublas|cublasLt|cudart|nvrtc|cufft|curand|cusparse|cusolver|nccl"
     r"|nvinfer|nvJitLink|nvToolsExt)\w{0,30}\.so|Could not load library cudnn",
     "a CUDA library (cuDNN, cuBLAS, the CUDA runtime) that torch, onnxruntime or TensorFlow was built against is "
     "not found, or another version is: install the version the package names (pip install nvidia-cudnn-cu12 "
     "or nvidia-cublas-cu12 at the major version in the file name, or a torch wheel that bundles them), or put "
     "its folder on LD_LIBRARY_PATH (PATH on Windows); do not install OpenCV or libGL packages for it"),
    ("shape_mismatch", "fixed_input_size", r"Got invalid dimensions for input",
     "the ONNX model was exported for one input size, which the message gives (index, got, expected): resize or "
     "pad the input to exactly that size, or export the model again with dynamic axes (torch.onnx.export(..., "
     "dynamic_axes={'input': {2: 'height', 3: 'width'}}))"),
    ("missing_dependency", "onnxruntime_provider", r"LoadLibrary failed with error \d+|Failed to create (CUDA|TensorRT)"
     r"ExecutionProvider|onnxruntime_providers_\w+\.(dll|so)",
     "onnxruntime-gpu could not load its CUDA provider: the CUDA and cuDNN versions it was built for are not on PATH "
     "(LD_LIBRARY_PATH on Linux): install those (onnxruntime-gpu 1.19 and later: CUDA 12 and cuDNN 9, e.g. pip "
     "install nvidia-cudnn-cu12), or import torch first, which loads its own; else run with the CPU provider"),
    ("missing_dependency", "tensorrt_engine", r"Version tag does not match|Engine deserialization failed|serialized engine",
     "a TensorRT engine runs only on the TensorRT version (and GPU) that built it: rebuild the engine from the ONNX "
     "model on the machine that runs it (trtexec --onnx=model.onnx --saveEngine=model.engine); pip cannot fix this"),
    ("missing_dependency", "jvm_extension", r"java\.lang\.\w+Error|java\.lang\.ClassNotFoundException|ai\.djl\."
     r"|Error loading a Deep Learning engine|native library",
     "a Java extension or its deep-learning engine does not match the application loading it: install the extension "
     "release built for your QuPath, Fiji or ImageJ version, and let DJL download the engine it names (or point "
     "it to one, with the matching CUDA); pip cannot fix this"),
    ("missing_dependency", "registry", r"is not in the [\w:]+ registry",
     "the class the config names is not registered: the module that defines it was not imported, or the installed "
     "OpenMMLab package (mmcv, mmengine, mmseg, mmdet) is another version than the config was written for: add "
     "its module to custom_imports in the config (or import it before building), or install the versions the "
     "project pins"),
    ("missing_dependency", "system_library", r"lib[\w.+-]{1,60}\.so[\d.]{0,12}: cannot open shared object file"
     r"|Error loading shared library lib[\w.+-]{1,60}\.so",
     "a system library is missing, not a Python package: install it with the OS package manager (libGL: "
     "apt-get install libgl1, or use opencv-python-headless; libgthread/libglib: apt-get install libglib2.0-0; "
     "libSM, libXext, libXrender: opencv-python-headless); `ldd` on the failing .so lists what else is missing"),
    ("missing_dependency", "windows_dll", r"WinError 126|DLL load failed|Error loading \"[^\"\n]{1,300}\.dll\"",
     "a DLL that the package (most often torch's c10.dll or its CUDA DLLs) needs did not load: install the Microsoft "
     "Visual C++ Redistributable (x64, 2015-2022), then reinstall torch in a fresh environment with the command "
     "from pytorch.org/get-started (a conda and a pip torch in one environment, or a CUDA build without a driver, "
     "also do it); `mlbench doctor` shows what loads"),
    ("queue_timeout", "model_loading", r"is currently loading|Loading model|model is loading",
     "the model is still loading on the server: wait the estimated time it gives and retry (with a backoff); "
     "for your own service, send requests only after its health check says the model is loaded"),
    ("queue_timeout", "name_resolution", r"Name or service not known|getaddrinfo failed|NameResolutionError"
     r"|Temporary failure in name resolution|nodename nor servname|Failed to resolve",
     "the service's host name does not resolve: check the URL's host (a typo, a Docker Compose service name used "
     "from outside its network, no DNS in the container)"),
    ("queue_timeout", "tls", r"CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError|SSLError|WRONG_VERSION_NUMBER",
     "the TLS handshake failed: pass the CA bundle that signed the service's certificate (verify='/path/ca.pem'), "
     "or use http:// for a service that does not speak TLS (WRONG_VERSION_NUMBER); do not turn verification off"),
    ("weights_missing", "model_repository", r"no version is available|failed to poll model|not found in any model repository",
     "the inference server found no loadable version of the model in its repository: check the layout "
     "<repository>/<model>/<version number>/model.<ext> with its config.pbtxt, and the server's startup log for "
     "why the version did not load"),
    ("queue_timeout", "worker_timeout", r"WORKER TIMEOUT",
     "gunicorn killed a worker that did not report back within its --timeout (30 s by default): a model loaded at "
     "the worker's start, or one long request, outlasted it: raise --timeout, load the model once before the "
     "workers fork (--preload) or in a startup hook, keep long work out of the request, and in Docker pass "
     "--worker-tmp-dir /dev/shm (a slow disk there delays the heartbeat)"),
    ("queue_timeout", "connection_reset", r"Connection reset by peer|RemoteDisconnected|Server disconnected"
     r"|upstream prematurely closed|ECONNRESET",
     "the server closed the connection without answering: its worker most likely died during the request (a "
     "crash, or killed for memory) or was restarted: read the server's log at that time for a traceback, a "
     "'WORKER TIMEOUT' or an OOM kill (dmesg, docker inspect --format '{{.State.OOMKilled}}') before retrying"),
    ("queue_timeout", "nothing_listening", r"Connection refused|Errno 111|ECONNREFUSED|Failed to establish a new connection"
     r"|StatusCode\.UNAVAILABLE|failed to connect to all addresses",
     "nothing is listening at that address (the service, or its queue's broker: Redis, RabbitMQ): start it or wait "
     "until its startup and model loading finish, check the host and port, and from another container use the "
     "service's name instead of localhost"),
)

_COMPILED = [((cls,) if isinstance(cls, str) else cls, name, re.compile(pattern, re.I | re.M | re.ASCII), fix)
             for cls, name, pattern, fix in CAUSES]


def cause_meaning(fix: str) -> str:
    """What a cause's fix says happened: its text up to the first ``": "`` outside parentheses (each
    fix is written "what happened: what to do")."""
    depth = 0
    for i, char in enumerate(fix):
        depth += (char == "(") - (char == ")")
        if depth == 0 and fix.startswith(": ", i):
            return fix[:i]
    return fix


def find_cause(failure_class: str, text: str) -> tuple[str, str] | None:
    """``(cause, fix)`` of the first cause of ``failure_class`` that ``text`` names, else None."""
    return next(((name, fix) for classes, name, pattern, fix in _COMPILED
                 if failure_class in classes and pattern.search(text)), None)
