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

__all__ = ["CAUSES", "find_cause"]

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
     "the kernel's OOM killer stopped the process: host RAM or the container's memory limit ran out, not the GPU; "
     "raise the memory limit, lower the batch, the input size or the number of workers, and check the need with "
     "mb.estimate_memory(model, input_shape, device='cpu')"),
    ("weights_missing", "not_a_torch_archive", r"locating file data\.pkl",
     "the file is a zip archive but not one torch.save wrote (another tool's archive, or damaged): "
     "mb.check_weights(path) says what it holds; fetch the checkpoint the model was saved to"),
    ("nan_output", "nonfinite_weights", r"tensor\(s\) hold NaN|NaN (or Inf )?in (the )?(weights|checkpoint|state dict)"
     r"|(weights|checkpoint|parameters) (contain|hold|have) (NaN|nan|inf)",
     "the weights themselves hold NaN or Inf (the training diverged): load an earlier checkpoint; "
     "mb.check_weights(path) lists the tensors"),
    ("image_format", "other_kind_of_file", r"not a recognised image \(PNG, JPEG, TIFF, BMP, GIF, WebP\); it is ",
     "the file is another kind of file, which the message names: convert it as the message says, then check the "
     "result with mb.check_image(path)"),
    ("weights_mismatch", "torchscript_archive", r"TorchScript archive|torch\.jit\.save\b|with TorchScript",
     "the file is a TorchScript archive (torch.jit.save), not a state dict: if you trust it, save its weights with "
     "torch.save(torch.jit.load(path, map_location='cpu').state_dict(), 'weights.pth') and load those"),
    ("weights_mismatch", "not_torchscript", r"locating file constants\.pkl",
     "torch.jit.load was given a torch.save checkpoint (a state_dict or a pickled model), not TorchScript: load it "
     "with torch.load(path, map_location='cpu') or mb.check_weights(path), or export TorchScript with "
     "torch.jit.script(model).save(path)"),
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
    ("device_mismatch", "disk_full", r"No space left on device|\[Errno 28\]|ENOSPC|disk quota exceeded",
     "a disk is full (the container's writable layer, /tmp, a cache or the output folder), not a compute device: "
     "free space (df -h shows which), or point TMPDIR and the caches at a larger volume"),
    (("device_mismatch", "dtype_mismatch"), "half_on_cpu", r"not implemented for '(Half|BFloat16)'",
     "this operation has no half-precision kernel on the CPU: run float32 there (model.float(), x.float()) and keep "
     "float16/bfloat16 for the GPU (torch.autocast)"),
    ("dtype_mismatch", "contour_mask_type", r"CV_8UC1|FindContours supports only",
     "cv2.findContours takes a single-channel uint8 mask: pass (probabilities > threshold).astype(np.uint8), not "
     "the float probabilities or a bool array"),
    ("dtype_mismatch", "index_type", r"tensors used as indices must be",
     "index with an integer or a boolean tensor: labels.long(), or a boolean mask such as probabilities > threshold"),
    ("dtype_mismatch", "unsigned_array", r"type numpy\.uint(16|32|64)\b",
     "torch.from_numpy cannot take this unsigned NumPy type: convert first (image.astype(np.float32) / 65535 for "
     "16-bit), or read with mb.read_image and let the pipeline scale by the image's bit depth"),
    ("shape_mismatch", "map_of_one_pixel", r"Expected more than 1 (value per channel|spatial element)",
     "a norm got a 1 x 1 map: BatchNorm in training mode with one image (call model.eval()), or an input so small "
     "that the deepest level is one pixel (use at least the model's min_input_size; pad small images)"),
    ("shape_mismatch", "input_too_small", r"Kernel size can't be greater than actual input size|Output size is too small",
     "the input is smaller than the model's downsampling allows: pad or resize it to at least the model's "
     "min_input_size (a multiple of its input_multiple)"),
    ("queue_timeout", "name_resolution", r"Name or service not known|getaddrinfo failed|NameResolutionError"
     r"|Temporary failure in name resolution|nodename nor servname|Failed to resolve",
     "the service's host name does not resolve: check the URL's host (a typo, a Docker Compose service name used "
     "from outside its network, no DNS in the container)"),
    ("queue_timeout", "tls", r"CERTIFICATE_VERIFY_FAILED|SSLCertVerificationError|SSLError|WRONG_VERSION_NUMBER",
     "the TLS handshake failed: pass the CA bundle that signed the service's certificate (verify='/path/ca.pem'), "
     "or use http:// for a service that does not speak TLS (WRONG_VERSION_NUMBER); do not turn verification off"),
    ("queue_timeout", "nothing_listening", r"Connection refused|Errno 111|ECONNREFUSED|Failed to establish a new connection",
     "nothing is listening at that address (the service, or its queue's broker: Redis, RabbitMQ): start it or wait "
     "until its startup and model loading finish, check the host and port, and from another container use the "
     "service's name instead of localhost"),
)

_COMPILED = [((cls,) if isinstance(cls, str) else cls, name, re.compile(pattern, re.I | re.M | re.ASCII), fix)
             for cls, name, pattern, fix in CAUSES]


def find_cause(failure_class: str, text: str) -> tuple[str, str] | None:
    """``(cause, fix)`` of the first cause of ``failure_class`` that ``text`` names, else None."""
    return next(((name, fix) for classes, name, pattern, fix in _COMPILED
                 if failure_class in classes and pattern.search(text)), None)
