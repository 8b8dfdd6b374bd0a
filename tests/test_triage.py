"""Triage: the rule base on a corpus of real-looking error texts, numbers, robustness, CLI."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from mlbench.errors import OptionsError
from mlbench.failures._triage import FAILURE_CLASSES, Diagnosis, add_triage_command, triage

def _load(name: str) -> list[dict]:
    """One labelled set of error texts from tests/data (JSON lines)."""
    return [json.loads(line) for line in (Path(__file__).parent / "data" / f"{name}.jsonl").read_text().splitlines()]


CORPUS = _load("triage_corpus")


def test_corpus_is_large_and_covers_every_class():
    counts = Counter(row["expected"] for row in CORPUS)
    assert len(CORPUS) >= 150
    assert set(counts) == set(FAILURE_CLASSES) - {"unknown"}
    assert min(counts.values()) >= 10


def test_corpus_accuracy_at_least_90_percent():
    got = [(row["expected"], triage(row["text"], casebook=False).failure_class, row["text"][:80]) for row in CORPUS]
    wrong = [g for g in got if g[0] != g[1]]
    accuracy = 1 - len(wrong) / len(CORPUS)
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f}; wrong: {wrong[:10]}"


def test_each_diagnosis_takes_milliseconds():
    started = time.perf_counter()
    for row in CORPUS[:60]:
        triage(row["text"], casebook=False)
    assert (time.perf_counter() - started) / 60 < 0.25  # about 5 ms each on an idle core; CI machines are busy


def test_oom_numbers_old_and_new_torch_messages():
    old = triage("RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB (GPU 0; 10.76 GiB total capacity; "
                 "9.68 GiB already allocated; 16.81 MiB free; 9.81 GiB reserved in total by PyTorch)", casebook=False)
    assert old.failure_class == "cuda_oom"
    assert old.numbers["requested_bytes"] == 20 * 2**20
    assert old.numbers["free_bytes"] == int(16.81 * 2**20)
    assert old.numbers["total_bytes"] == int(10.76 * 2**30)
    assert "requested 20 MiB with 16.8 MiB free of 10.8 GiB total on cuda:0" in old.explanation  # mb.findings.format_bytes
    new = triage("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of "
                 "23.69 GiB of which 1.31 GiB is free.", casebook=False)
    assert new.numbers["requested_bytes"] == 2 * 2**30 and new.numbers["device"] == "cuda:1"
    cpu = triage("RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 17179869184 bytes.", casebook=False)
    assert cpu.numbers["requested_bytes"] == 17179869184 and cpu.numbers["device"] == "cpu"


def test_state_dict_keys_and_prefix_are_counted():
    text = ('RuntimeError: Error(s) in loading state_dict for UNet:\n\tMissing key(s) in state_dict: "a.weight", "b.weight", "c.bias".\n'
            '\tUnexpected key(s) in state_dict: "module.a.weight", "module.b.weight", "module.c.bias".')
    d = triage(text, casebook=False)
    assert d.failure_class == "weights_mismatch"
    assert (d.numbers["missing_keys"], d.numbers["unexpected_keys"], d.numbers["prefix"]) == (3, 3, "module.")
    assert "consume_prefix_in_state_dict_if_present" in d.fix
    sizes = triage("size mismatch for fc.weight: copying a param with shape torch.Size([1000, 2048]) from checkpoint, "
                   "the shape in current model is torch.Size([2, 2048]).", casebook=False)
    assert sizes.numbers["size_mismatches"][0] == {"key": "fc.weight", "checkpoint": "[1000, 2048]", "model": "[2, 2048]"}


def test_shape_dependency_and_dtype_numbers():
    shape = triage("RuntimeError: The size of tensor a (124) must match the size of tensor b (125) at non-singleton dimension 3",
                   casebook=False)
    assert (shape.numbers["size_a"], shape.numbers["size_b"], shape.numbers["dimension"]) == (124, 125, 3)
    dep = triage("ModuleNotFoundError: No module named 'cv2'", casebook=False)
    assert dep.numbers == {"module": "cv2", "pip_package": "opencv-python-headless"}
    assert dep.fix.startswith("pip install opencv-python-headless")
    dtype = triage("RuntimeError: expected scalar type Float but found Double", casebook=False)
    assert dtype.numbers == {"expected": "Float", "found": "Double"}
    half = triage("RuntimeError: Input type (torch.HalfTensor) and weight type (torch.FloatTensor) should be the same",
                  casebook=False)  # the weights say what the model expects; the input is what arrived
    assert (half.failure_class, half.numbers) == ("dtype_mismatch", {"expected": "torch.FloatTensor", "found": "torch.HalfTensor"})
    cast = triage("TypeError: Cannot cast array data from dtype('float64') to dtype('int64') according to the rule 'safe'",
                  casebook=False)
    assert cast.numbers == {"expected": "int64", "found": "float64"}


def test_device_versus_dtype_in_input_type_messages():
    assert triage("Input type (torch.cuda.FloatTensor) and weight type (torch.FloatTensor) should be the same",
                  casebook=False).failure_class == "device_mismatch"
    assert triage("Input type (torch.cuda.HalfTensor) and weight type (torch.cuda.FloatTensor) should be the same",
                  casebook=False).failure_class == "dtype_mismatch"


def test_exception_object_with_chained_cause():
    def load():
        try:
            raise FileNotFoundError("[Errno 2] No such file or directory: 'weights/hrnet_best_model.pth'")
        except FileNotFoundError as exc:
            raise RuntimeError("model could not be loaded") from exc

    with pytest.raises(RuntimeError, match="could not be loaded") as info:
        load()
    d = triage(info.value, casebook=False)
    assert d.failure_class == "weights_missing"
    assert "hrnet_best_model.pth" in d.evidence
    assert d.exception_type == "FileNotFoundError"


def test_several_errors_give_one_diagnosis_each_root_cause_first():
    log = "\n".join([
        "2024-05-01 10:00:00 INFO started",
        'INFO:     10.0.0.1:5000 - "POST /api/v1/segment HTTP/1.1" 504 Gateway Timeout',
        "Traceback (most recent call last):",
        '  File "serve.py", line 10, in segment',
        "    out = model(x)",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 4.00 GiB.",
        "2024-05-01 10:00:05 ERROR ModuleNotFoundError: No module named 'pynvml'",
        "2024-05-01 10:00:06 ERROR ModuleNotFoundError: No module named 'pynvml'",
    ])
    d = triage(log, casebook=False)
    classes = [x.failure_class for x in d.all]
    assert classes == ["cuda_oom", "missing_dependency", "queue_timeout"]
    assert d.line == 6 and d.others[0].count == 2 and d.others[0].line == 7
    assert "2 more error(s)" in repr(d)


@pytest.mark.parametrize("source, reason", [
    ("", "the input is empty"),
    ("   \n\n  ", "the input is empty"),
    (bytes(range(256)) * 64, "looks binary"),
    ("all went fine today\nthe weather was nice", "no known error pattern in 2 line(s)"),
])
def test_nothing_recognisable_gives_unknown_with_reason(source, reason):
    d = triage(source, casebook=False)
    assert d.failure_class == "unknown" and reason in d.explanation and d.numbers["reason"]


def test_large_log_is_streamed_quickly(tmp_path):
    line = b"2024-05-01 12:00:00,123 INFO worker-3 processed request id=12345 in 0.031 seconds status=200 OK\n"
    block = line * 20000
    path = tmp_path / "big.log"
    with open(path, "wb") as handle:
        for i in range(53):  # about 100 MB
            handle.write(block)
            if i == 30:
                handle.write(b"RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)\n")
    assert path.stat().st_size > 100_000_000
    started = time.perf_counter()
    d = triage(path, casebook=False)
    assert time.perf_counter() - started < 150  # about 4 s on an idle core (bytes.find per keyword), 30 s when 8x loaded
    assert d.failure_class == "cuda_oom" and d.line == 31 * 20000 + 1


def test_stream_and_binary_stream():
    assert triage(io.BytesIO(b"ImportError: libGL.so.1: cannot open shared object file"), casebook=False).failure_class == "missing_dependency"
    assert triage(io.StringIO("HTTP/1.1 429 Too Many Requests"), casebook=False).failure_class == "queue_timeout"
    garbage = io.BytesIO(bytes(range(256)) * 20000)  # 5 MB without newlines: the large-input path
    assert triage(garbage, casebook=False).failure_class in FAILURE_CLASSES


def test_bad_arguments_raise():
    with pytest.raises(OptionsError, match="triage takes an exception, text"):
        triage(12345)
    with pytest.raises(OptionsError, match="is not a file"):
        triage(Path("/nonexistent/log.txt"))


def test_repr_and_to_dict_are_stable():
    d = triage("ModuleNotFoundError: No module named 'psutil'", casebook=False)
    assert isinstance(d, Diagnosis)
    assert repr(d).startswith("missing_dependency (line 1): missing or broken dependency")
    data = json.loads(json.dumps(d.to_dict()))
    assert data["failure_class"] == "missing_dependency" and data["notebook"] == "09_dependencies_and_devices.ipynb"


def test_cli(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_triage_command(parser.add_subparsers(dest="command"))
    log = tmp_path / "err.txt"
    log.write_text("RuntimeError: Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!")
    args = parser.parse_args(["triage", str(log), "--json"])
    assert args.run(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["failure_class"] == "device_mismatch" and out["numbers"]["devices"] == ["cpu", "cuda:0"]


# ---- real error texts from public issue threads (tests/data/triage_real.jsonl) ------------------
REAL = _load("triage_real")


def test_real_set_is_large_labelled_and_sourced():
    counts = Counter(row["expected"] for row in REAL)
    assert len(REAL) >= 150 and set(counts) == set(FAILURE_CLASSES) - {"unknown"}
    assert min(counts.values()) >= 8
    assert all(row["url"].startswith("https://github.com/") and row["source"] and row["text"].strip() for row in REAL)
    assert len({row["url"] for row in REAL}) == len(REAL)


def _accuracy_and_misses(rows: list[dict]) -> tuple[float, list[tuple[str, str, str]]]:
    got = [(row["expected"], triage(row["text"], casebook=False).failure_class, row["url"]) for row in rows]
    wrong = [g for g in got if g[0] != g[1]]
    return 1 - len(wrong) / len(rows), wrong




@pytest.mark.parametrize("wrap", [
    lambda t: "\n".join("api_1  | " + line for line in t.splitlines()),            # docker compose prefix
    lambda t: "\n".join("E       " + line for line in t.splitlines()),             # pytest
    lambda t: "\n".join("> " + line for line in t.splitlines()),                   # quoted reply
    lambda t: ('Downloading: "https://download.pytorch.org/models/resnet34-333f7ec4.pth" to /root/.cache/torch/hub/checkpoints/'
               "resnet34-333f7ec4.pth\nINFO:     Started server process [1]\n" + t),  # progress lines before the error
    lambda t: t + "\n\nThe above exception was the direct cause of the following exception:\n\nTraceback (most recent call "
                  'last):\n  File "/app/serve.py", line 88, in predict\n    return run(job)\nRuntimeError: job 17 failed',
])
def test_prefixes_noise_and_wrappers_keep_the_class(wrap):
    rows = REAL[::7]
    right = sum(triage(wrap(row["text"]), casebook=False).failure_class == row["expected"] for row in rows)
    assert right >= 0.9 * len(rows)


def test_benign_log_lines_alone_give_nothing_strong():
    log = ('Downloading: "https://download.pytorch.org/models/resnet34-333f7ec4.pth" to /root/.cache/torch/hub/checkpoints/x.pth\n'
           "100%|██████████| 83.3M/83.3M [00:01<00:00, 60.1MB/s]\nINFO:     Uvicorn running on http://0.0.0.0:8000\n"
           "|   0  NVIDIA GeForce RTX 3060        Off |   00000000:81:00.0  On |                  N/A |\n"
           "[pip3] nvidia-cudnn-cu12==9.10.2.21\n[pip3] torch==2.9.0+cu128")
    assert triage(log, casebook=False).confidence < 4.5


def test_timeout_then_kill_is_a_timeout_and_kill_alone_is_memory():
    log = ("[2024-11-05 09:25:59 +0000] [16] [CRITICAL] WORKER TIMEOUT (pid:17)\n"
           "[2024-11-05 09:26:00 +0000] [16] [ERROR] Worker (pid:17) was sent SIGKILL! Perhaps out of memory?")
    d = triage(log, casebook=False)
    assert [x.failure_class for x in d.all] == ["queue_timeout", "cuda_oom"]
    assert triage(log.splitlines()[1], casebook=False).failure_class == "cuda_oom"


@pytest.mark.parametrize("text, expected", [
    ("RuntimeError: Input type (torch.cuda.HalfTensor) and weight type (torch.HalfTensor) should be the same", "device_mismatch"),
    ("RuntimeError: Expected tensor for argument #1 'grad_output' to have the same type as tensor for argument #2 'weight'; "
     "but type torch.cuda.HalfTensor does not equal torch.cuda.FloatTensor", "dtype_mismatch"),
    ("Expected object of type torch.FloatTensor but found type torch.LongTensor for argument #2 'target'", "dtype_mismatch"),
])
def test_tensor_type_pairs_decide_device_or_dtype(text, expected):
    assert triage(text, casebook=False).failure_class == expected


@pytest.mark.parametrize("text, expected", [
    ('Traceback (most recent call last):\n  File "demo.py", line 60, in main\n    model.load_state_dict(torch.load(args.ckpt))\n'
     "FileNotFoundError: [Errno 2] No such file or directory: '/path/to/ckpt/'", "weights_missing"),
    ('Traceback (most recent call last):\n  File "eval.py", line 12, in load\n    img = Image.open(p)\n'
     "FileNotFoundError: [Errno 2] No such file or directory: 'data/val/0001'", "image_format"),
    ("IsADirectoryError: [Errno 21] Is a directory: 'lsd_checkpoints/run_1/model_checkpoint_300000/data'", "weights_missing"),
])
def test_a_missing_file_is_weights_or_image_by_context(text, expected):
    assert triage(text, casebook=False).failure_class == expected


def test_ipython_frames_count_less_than_the_message():
    text = ("AttributeError                            Traceback (most recent call last)\n"
            "<ipython-input-96-ce37cf25e494> in <module>\n      8       img = cv2.imread('train/' + row['ImageID'])\n"
            "---> 10       height, width = img.shape[:2]\n\nAttributeError: 'NoneType' object has no attribute 'shape'")
    d = triage(text, casebook=False)
    assert d.failure_class == "image_format" and d.evidence.startswith("AttributeError")


# ---- numbers pulled from real texts ---------------------------------------------------------------
def test_oom_numbers_from_numpy_tf_and_misspelt_messages():
    d = triage("ArrayMemoryError: Unable to allocate 117. GiB for an array with shape (104812, 5070, 59) and data type int32",
               casebook=False)
    assert d.numbers["requested_bytes"] == 117 * 2**30 and d.numbers["device"] == "cpu"
    d = triage("torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 3.94 GiB. GPU 0 has a total capacty of "
               "23.64 GiB of which 3.88 GiB is free.", casebook=False)
    assert d.numbers["total_bytes"] == int(23.64 * 2**30) and d.numbers["free_bytes"] == int(3.88 * 2**30)
    d = triage("I tensorflow/stream_executor/cuda/cuda_driver.cc:739] failed to allocate 2.12G (2282521344 bytes) from device: "
               "CUDA_ERROR_OUT_OF_MEMORY: out of memory", casebook=False)
    assert d.numbers["requested_bytes"] == 2282521344


@pytest.mark.parametrize("key, says", [("v", "Git LFS pointer"), ("<", "HTML page"), ("\\x00", "zero-filled")])
def test_weights_load_key_says_what_the_file_is(key, says):
    d = triage(f"_pickle.UnpicklingError: invalid load key, '{key}'.", casebook=False)
    assert d.failure_class == "weights_missing" and d.numbers["load_key"] == key
    assert says in d.explanation and says in d.fix


def test_weights_missing_path_and_truncation():
    d = triage("FileNotFoundError: [Errno 2] No such file or directory: 'checkpoints/epoch=41.ckpt'", casebook=False)
    assert d.numbers["path"] == "checkpoints/epoch=41.ckpt"
    d = triage("RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory", casebook=False)
    assert d.numbers["file_is"].startswith("truncated")


def test_device_numbers_container_cuda_and_gpu_capability():
    d = triage("nvidia-container-cli: requirement error: unsatisfied condition: cuda>=12.8, please update your driver to a "
               "newer version, or use an earlier cuda container", casebook=False)
    assert d.failure_class == "device_mismatch" and d.numbers["required_cuda"] == "12.8" and "CUDA 12.8" in d.fix
    d = triage("UserWarning: NVIDIA RTX A6000 with CUDA capability sm_86 is not compatible with the current PyTorch installation.\n"
               "The current PyTorch install supports CUDA capabilities sm_37 sm_50 sm_60 sm_70.", casebook=False)
    assert d.numbers["gpu_capability"] == "sm_86" and d.numbers["supported_capabilities"] == ["sm_37", "sm_50", "sm_60", "sm_70"]


def test_dependency_numbers_broken_extension_and_removed_attribute():
    d = triage("ImportError: /opt/env/lib/python3.7/site-packages/torchvision/_C.so: undefined symbol: _ZN3c105ErrorC1E",
               casebook=False)
    assert d.numbers["module"] == "torchvision" and d.numbers["broken_extension"] and "--force-reinstall torchvision" in d.fix
    d = triage("AttributeError: module 'PIL.Image' has no attribute 'ANTIALIAS'", casebook=False)
    assert d.failure_class == "missing_dependency" and d.numbers["missing_attribute"] == "ANTIALIAS"
    assert "PIL.Image.ANTIALIAS" in d.fix


@pytest.mark.parametrize("text, expected", [
    ("cv2.error: OpenCV(4.1.0) window.cpp:352: error: (-215:Assertion failed) size.width>0 && size.height>0 in function "
     "'cv::imshow'", "image_format"),
    ("cv2.error: OpenCV(4.5.1) error: (-215:Assertion failed) src.type() == CV_8UC1 in function 'threshold'", "dtype_mismatch"),
    ("error: (-215:Assertion failed) 0 <= contourIdx && contourIdx < (int)last in function 'cv::drawContours'", "postprocessing"),
    ("cv2.error: OpenCV(4.8.0) warp.cpp:1234: error: (-215:Assertion failed) !src.empty() in function 'warpAffine'",
     "image_format"),
])
def test_opencv_assertions_by_failing_function_or_type_check(text, expected):
    assert triage(text, casebook=False).failure_class == expected


# ---- round 2: a second, fresh set of real texts (other libraries, services and wordings) --------
REAL2 = _load("triage_real2")


def _assert_new_and_sourced(rows: list[dict], earlier: list[dict]) -> None:
    """Every row sourced from a GitHub thread and labelled with a known class; none of them (by url or
    opening) in an earlier set."""
    assert all(row["url"].startswith("https://github.com/") and row["source"] and row["text"].strip() for row in rows)
    assert {row["expected"] for row in rows} <= set(FAILURE_CLASSES)
    urls = [row["url"] for row in rows]
    assert len(set(urls)) == len(urls) and not set(urls) & {row.get("url") for row in earlier}
    assert not {row["text"][:200] for row in rows} & {row["text"][:200] for row in earlier}


def test_real_set_round2_is_new_labelled_and_sourced():
    counts = Counter(row["expected"] for row in REAL2)
    assert len(REAL2) >= 120 and set(counts) == set(FAILURE_CLASSES) - {"unknown"}
    _assert_new_and_sourced(REAL2, REAL)


@pytest.mark.parametrize("text, expected", [
    # a model hub that times out is a weights download that failed; a hub that rate-limits is still a 429
    ("requests.exceptions.ConnectionError: HTTPSConnectionPool(host='cdn-lfs.huggingface.co', port=443): Read timed out.",
     "weights_missing"),
    ("requests.exceptions.HTTPError: 429 Client Error: Too Many Requests for url: https://huggingface.co/x/resolve/main/config.json",
     "queue_timeout"),
    ("httpx.ReadTimeout: timed out", "queue_timeout"),
    ("ReadTimeout: HTTPSConnectionPool(host='api-inference.huggingface.co', port=443): Read timed out.", "queue_timeout"),
    # an RGBA image reaching a 3-channel Normalize
    ('  File "transforms.py", line 175, in __call__\n    return F.normalize(tensor, self.mean, self.std)\n'
     "RuntimeError: The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension 0", "image_format"),
    ("RuntimeError: The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension 0", "shape_mismatch"),
    # the library that raised decides when the message does not; a '<module>' frame is not a missing module
    ('Traceback (most recent call last):\n  File "<stdin>", line 1, in <module>\n'
     '  File "/usr/lib/python3/dist-packages/PIL/TiffImagePlugin.py", line 644, in _seek\n    self.tag.load(self.fp)\n'
     "IndexError: index out of range", "image_format"),
    ('Traceback (most recent call last):\n  File "app.py", line 3, in <module>\n    main()\nKeyError: 3', "unknown"),
    # OpenCV: an empty source is an unreadable image, an empty destination size is a shape problem
    ("error: (-215:Assertion failed) !ssize.empty() in function 'cv::resize'", "image_format"),
    ("error: (-215:Assertion failed) !dsize.empty() in function 'resize'", "shape_mismatch"),
    ("WeightsUnpickler error: Unsupported operand 118", "weights_missing"),
    ("TypeError: __init__() got an unexpected keyword argument 'pretrained_cfg'", "missing_dependency"),
    ("RasterioIOError: 'scene.hdf' not recognized as a supported file format.", "image_format"),
    ("Invalid argument 2: 3D or 4D input tensor expected but got: [32 x 784]", "shape_mismatch"),
    ("my loss value is all NaN and the prediction is all black", "nan_output"),
])
def test_library_context_and_new_wordings(text, expected):
    assert triage(text, casebook=False).failure_class == expected


# ---- round 3: a third fresh set, log formats (ANSI, JSON records, flattened tracebacks) -------------
REAL3 = _load("triage_real3")


def test_real_set_round3_is_new_labelled_and_sourced():
    counts = Counter(row["expected"] for row in REAL3)
    assert len(REAL3) >= 120 and set(counts) == set(FAILURE_CLASSES) - {"unknown"}
    _assert_new_and_sourced(REAL3, REAL + REAL2 + CORPUS)


@pytest.mark.parametrize("rows", [REAL, REAL2, REAL3], ids=["round1", "round2", "round3"])
def test_real_issue_texts_accuracy(rows):
    accuracy, wrong = _accuracy_and_misses(rows)
    assert accuracy >= 0.9, f"accuracy {accuracy:.3f}; wrong: {wrong[:10]}"


@pytest.mark.parametrize("wrap", [
    lambda t: "\n".join("\x1b[0;31m" + line + "\x1b[0m" for line in t.splitlines()),   # Jupyter / rich colours
    lambda t: "\n".join("[0;31m" + line + "[0m" for line in t.splitlines()),           # colours whose ESC byte was lost
    lambda t: json.dumps({"asctime": "2025-01-02 10:00:01,123", "levelname": "ERROR", "name": "svc",
                          "message": "request failed", "exc_info": t}),                 # a JSON log record, newlines escaped
    lambda t: "\n".join(json.dumps({"log": line + "\n", "stream": "stderr"}) for line in t.splitlines()),  # docker json-file
    lambda t: " ".join(line.strip() for line in t.splitlines()),                       # a traceback flattened onto one line
])
def test_log_formats_keep_the_class(wrap):
    rows = REAL3[::4]
    right = sum(triage(wrap(row["text"]), casebook=False).failure_class == row["expected"] for row in rows)
    assert right >= 0.9 * len(rows)


def test_json_record_points_at_the_line_the_user_pasted():
    text = ('INFO:     Started server process [1]\n{"levelname": "ERROR", "message": "predict failed", "exc_info": '
            '"Traceback (most recent call last):\\n  File \\"/app/x.py\\", line 3, in f\\n    y = m(x)\\n'
            'torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB"}')
    d = triage(text, casebook=False)
    assert (d.failure_class, d.line, d.numbers["requested_bytes"]) == ("cuda_oom", 2, 2 * 2**30)


@pytest.mark.parametrize("text, expected", [
    # cuDNN missing is a missing native library; libcuda missing is the driver
    ("Could not load library libcudnn_ops_infer.so.8. Error: libcudnn_ops_infer.so.8: cannot open shared object file", "missing_dependency"),
    ("Could not load library libcudnn_cnn_infer.so.8. Error: libcuda.so: cannot open shared object file: No such file or directory",
     "device_mismatch"),
    # PIL's type key: a float RGB array is a dtype problem, a uint8 array with extra axes a shape problem
    ("TypeError: Cannot handle this data type: (1, 1, 3), <f4", "dtype_mismatch"),
    ("TypeError: Cannot handle this data type: (1, 1, 1024, 4), |u1", "shape_mismatch"),
    # an HTTP error while a model is built is a failed weights download; alone it says nothing
    ('model = models.CellposeModel(model_type="cyto3")\nurllib.error.HTTPError: HTTP Error 500: Internal Server Error', "weights_missing"),
    ('[INFO] Downloading: "https://www.cellpose.org/models/nuclei_0" to /root/.cellpose/models/nuclei_0\n'
     "ERROR: HTTP Error 500: INTERNAL SERVER ERROR", "weights_missing"),
    ("urllib.error.HTTPError: HTTP Error 500: Internal Server Error", "unknown"),
    # an IPython traceback cut before its message: the header names the exception
    ("GEOSException                             Traceback (most recent call last)\n<ipython-input-80-8f14df048e4b> in <module>\n"
     "---> 51 simplify(shapes)", "postprocessing"),
    ("dicom.errors.InvalidDicomError: File is missing 'DICM' marker. Use force=True to force reading", "image_format"),
    ("W tensorflow/core/framework/allocator.cc:101] Allocation of 411041792 exceeds 10% of system memory.", "cuda_oom"),
    ("The model sees z-score standardized images during training, but not during evaluation.", "normalization"),
    ("TypeError: Labelled image must be of integer dtype.", "postprocessing"),
    ("ValueError: Could not find a backend to open `cells.png`` with iomode `r?`.", "missing_dependency"),
    ("ValueError: Could not find a backend to open `scan_03.czi`` with iomode `r`.", "image_format"),
    # serving stacks: Kubernetes evictions and scheduling, Ray's memory monitor, ONNX Runtime and Triton inputs
    ("Message:        The node was low on resource: memory. Container api was using 43536Ki, which exceeds its request of 0.", "cuda_oom"),
    ("Warning  FailedScheduling  2s (x57 over 15m)  default-scheduler  0/6 nodes are available: 6 Insufficient nvidia.com/gpu.",
     "device_mismatch"),
    ("Memory on the node (IP: 172.31.237.1) where the task was running was 219.41GB / 230.40GB (0.952289), which exceeds the memory "
     "usage threshold of 0.95. Ray killed this worker", "cuda_oom"),
    ("InvalidArgument: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Unexpected input data type. Actual: (tensor(double)) , "
     "expected: (tensor(float))", "dtype_mismatch"),
    ("UNAVAILABLE: Invalid argument: model 'seg', tensor 'input.1': the model expects 4 dimensions (shape [1,3,224,224]) but the "
     "model configuration specifies 4 dimensions (shape [1,3,224,244])", "shape_mismatch"),
    ("cv2.error: OpenCV(4.11.0) drawing.cpp:2426: error: (-215:Assertion failed) p.checkVector(2, CV_32S) > 0 in function 'fillPoly'",
     "postprocessing"),
])
def test_round3_wordings_and_contexts(text, expected):
    assert triage(text, casebook=False).failure_class == expected


# ---- round 4: the libraries the held-out set names (torch/CUDA, Pillow, OpenCV, tifffile, NumPy, pydantic,
# ---- uvicorn/gunicorn, Celery, Docker and the NVIDIA container toolkit); split: every third row held out
REAL4 = _load("triage_real4")


_NAMED_LIBRARIES = {"torch", "pillow", "opencv", "tifffile", "numpy", "pydantic", "uvicorn", "gunicorn", "celery", "docker",
                    "nvidia-container-toolkit"}


def _assert_new_labelled_and_sourced(rows: list[dict], earlier: list[dict]) -> None:
    """At least 150 sourced rows from the named libraries, none of them (by url or opening) in an earlier set."""
    assert len(rows) >= 150 and {row["source"] for row in rows} >= _NAMED_LIBRARIES
    _assert_new_and_sourced(rows, earlier)


def _assert_accurate_with_held_out_third(rows: list[dict]) -> None:
    accuracy, wrong = _accuracy_and_misses(rows)
    held_accuracy, _ = _accuracy_and_misses(rows[2::3])
    assert accuracy >= 0.9 and held_accuracy >= 0.9, f"accuracy {accuracy:.3f}, held-out {held_accuracy:.3f}; wrong: {wrong[:10]}"


def test_real_set_round4_is_new_labelled_and_sourced():
    _assert_new_labelled_and_sourced(REAL4, REAL + REAL2 + REAL3 + CORPUS)


def test_real_issue_texts_round4_accuracy():
    _assert_accurate_with_held_out_third(REAL4)


@pytest.mark.parametrize("text, expected", [
    # NumPy's older casting wording; OpenCV channel-count checks, writers and empty sources; TIFF tiles; codecs
    ("TypeError: ufunc 'add' output (typecode 'd') could not be coerced to provided output parameter (typecode 'B') "
     "according to the casting rule ''same_kind''", "dtype_mismatch"),
    ("cv2.error: OpenCV(4.8.0) color.cpp:182: error: (-215:Assertion failed) scn == 3 || scn == 4 in function 'cvtColor'", "shape_mismatch"),
    ("imwrite_('out/mask.png'): can't write data: OpenCV(4.8.0) grfmt_png.cpp:400: error: (-215:Assertion failed) size > 0", "image_format"),
    ("error: (-215:Assertion failed) !ssize.empty() in function 'resize'\nerror: (-215:Assertion failed) inv_scale_x > 0 in function 'resize'",
     "image_format"),
    ("ValueError: invalid tile shape", "image_format"),
    ('  File "imagecodecs/_imcd.pyx", line 856, in imagecodecs._imcd.lzw_encode\nNotImplementedError: lzw_encode', "missing_dependency"),
    # PIL: a channel count it has no mode for is a shape problem, a float RGB array a dtype problem
    ("KeyError: ((1, 1, 5), '|u1')\nTypeError: Cannot handle this data type: (1, 1, 5), |u1", "shape_mismatch"),
    ("TypeError: Cannot handle this data type: (1, 1, 3), <f4", "dtype_mismatch"),
    # Celery losing its broker; a supervisor that gave up without a cause
    ("[2024-05-01 10:00:00,000: WARNING/MainProcess] consumer: Connection to broker lost. Trying to re-establish the connection...",
     "queue_timeout"),
    ("[ERROR/MainProcess] consumer: Cannot connect to redis://redis:6379/0: Error 111 connecting to redis:6379. Connection refused.",
     "queue_timeout"),
    ("gunicorn.errors.HaltServer: <HaltServer 'Worker failed to boot.' 3>", "unknown"),
    # docker logs -t: a timestamp before every traceback line; a traceback cut inside an import
    ("2021-01-06T04:40:40.709Z Traceback (most recent call last):\n2021-01-06T04:40:40.709Z   File \"/app/main.py\", line 1, in <module>\n"
     "2021-01-06T04:40:40.709Z     import cv2\n2021-01-06T04:40:40.709Z ImportError: libGL.so.1: cannot open shared object file", "missing_dependency"),
    ('Traceback (most recent call last):\n  File "/usr/lib/python3.8/importlib/__init__.py", line 127, in import_module\n'
     '    return _bootstrap._gcd_import(name[level:], package, level)\n  File "<frozen importlib._bootstrap>", line 1014, in _gcd_import',
     "missing_dependency"),
])
def test_round4_wordings_and_contexts(text, expected):
    assert triage(text, casebook=False).failure_class == expected


def test_a_pasted_code_line_does_not_outrank_the_error_after_it():
    text = " _,contours,_ = cv2.findContours(img, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)\n\n" \
           "error: (-210) [Start]FindContours supports only CV_8UC1 images when mode != CV_RETR_FLOODFILL in function cvStartFindContours"
    assert triage(text, casebook=False).failure_class == "dtype_mismatch"


# ---- round 5: fresh threads from the same libraries, found by symptom and function name; every third held out
REAL5 = _load("triage_real5")


def test_real_set_round5_is_new_labelled_and_sourced():
    _assert_new_labelled_and_sourced(REAL5, REAL + REAL2 + REAL3 + REAL4 + CORPUS)


def test_real_issue_texts_round5_accuracy():
    _assert_accurate_with_held_out_third(REAL5)


@pytest.mark.parametrize("text, expected", [
    # a CUDA kernel assert on an index outside its tensor is a label/vocabulary size problem, not the device
    ("/pytorch/aten/src/ATen/native/cuda/Loss.cu:242: nll_loss_forward_reduce_cuda_kernel_2d: block: [0,0,0], thread: [5,0,0] "
     "Assertion `t >= 0 && t < n_classes` failed.\nRuntimeError: CUDA error: device-side assert triggered", "shape_mismatch"),
    ("../aten/src/ATen/native/cuda/Indexing.cu:1146: indexSelectLargeIndex: block: [3,0,0], thread: [0,0,0] "
     "Assertion `srcIndex < srcSelectDimSize` failed.\nRuntimeError: CUDA error: device-side assert triggered", "shape_mismatch"),
    ("RuntimeError: CUDA error: device-side assert triggered", "device_mismatch"),  # without the assert line: unchanged
    # OpenCV 4 names the channel count it got; the older VScn check alone stays an image problem
    ("cv2.error: OpenCV(4.5.5) color.simd_helpers.hpp:92: error: (-2:Unspecified error) in function 'CvtHelper'\n"
     "> Invalid number of channels in input image:\n>     'VScn::contains(scn)'\n> where\n>     'scn' is 1", "shape_mismatch"),
    ("cv2.error: OpenCV(3.4.2) color.hpp:253: error: (-215:Assertion failed) VScn::contains(scn) && VDcn::contains(dcn) in function "
     "'CvtHelper'", "image_format"),
    # the user's own account of the cause; a checkpoint that is not there
    ("predicted masks are wrong. it was my bad, I did not normalize the input images", "normalization"),
    ("AssertionError: Error: no checkpoint directory found!", "weights_missing"),
    ("    assert os.path.isfile(args.resume), 'Error: no model checkpoint directory found!'", "weights_missing"),
])
def test_round5_wordings_and_contexts(text, expected):
    assert triage(text, casebook=False).failure_class == expected


def test_a_long_json_log_line_keeps_its_head_and_the_error_at_its_end():
    frames = "".join(f'  File "/srv/app/pipeline/stage_{i}.py", line {i}, in run_{i}\n    x = stage_{i}(x)\n' for i in range(60))
    record = json.dumps({"time": "2026-01-01T00:00:00Z", "level": "info", "logger": "inference.worker", "msg": "request failed",
                         "exc_info": "Traceback (most recent call last):\n" + frames
                         + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total capacity)"})
    assert len(record) > 4000
    filler = "".join(f"INFO request {i} handled in 12 ms\n" for i in range(80_000))  # over 2 MiB: the streamed path
    text = triage(io.BytesIO((filler + record + "\n" + filler).encode()), casebook=False)
    assert text.failure_class == "cuda_oom" and "Tried to allocate 2.00 GiB" in text.evidence
    from mlbench.failures.stream import read_stream
    kept = read_stream(io.BytesIO((filler + record + "\n").encode())).text
    line = next(line for line in kept.splitlines() if "inference.worker" in line)
    assert line.startswith('{"time": "2026-01-01') and " \u2026 " in line and len(line) < 2100 and line.endswith('capacity)"}')


@pytest.mark.parametrize(("status", "expected"), [(504, "queue_timeout"), (429, "queue_timeout"), (400, "validation_error"),
                                                  (422, "validation_error")])
def test_an_exception_carrying_an_http_status_is_classed_by_it(status, expected):
    from mlbench.client import ServiceError

    words = f"{status}: the service refused the upload of the image 'a.tif' (an image file, 524,544 bytes)"
    assert triage(ServiceError(status, words, {}, {}), casebook=False).failure_class == expected


# ---- linear time, the whole log, the size cap (issue 20) -------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
LAST = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity)"
PATHOLOGICAL = ["single_line", "error_words", "digit_run", "gap_rule_words", "blank_runs", "flat_frames", "tiny_errors",
                "distinct_errors"]


def test_pathological_logs_finish_in_linear_time_and_their_last_line_is_found():
    """Each of bench/triage_speed.py's pathological logs (one 1 MB line without newlines, long words full of
    "Error", digit runs, lines dense with the words of the line-gap rules, ...) at 100 KB and 1 MB, in a
    child process with a timeout: under 10 s at 1 MB (the old rules took over 60 s on a 1 MB line), at
    most about linear growth (the old ones grew 100-fold), and the CUDA error of the last line found."""
    import subprocess
    import sys

    code = (f"import json, sys, time; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}]\n"
            "from triage_speed import LOGS\nfrom mlbench.failures import triage\n"
            f"for name in {PATHOLOGICAL!r}:\n"
            "    for size in (100_000, 1_000_000):\n"
            "        data = LOGS[name](size).decode()\n"
            "        started = time.perf_counter(); found = triage(data, casebook=False)\n"
            "        print(json.dumps([name, size, time.perf_counter() - started, [d.failure_class for d in found.all]]), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    times = {}
    for name, size, seconds, classes in map(json.loads, done.stdout.splitlines()):
        assert "cuda_oom" in classes, (name, size, classes)
        times[name, size] = seconds
    assert set(times) == {(name, size) for name in PATHOLOGICAL for size in (100_000, 1_000_000)}
    for name in PATHOLOGICAL:
        small, large = times[name, 100_000], times[name, 1_000_000]
        assert large < 10, f"{name}: {large:.1f} s for 1 MB"
        assert large < 30 * small + 2, f"{name}: {small:.3f} s for 100 KB, {large:.3f} s for 1 MB: more than linear"


def _adversarial(rule, size: int = 12_000):
    """Strings of ``size`` characters built to make ``rule`` backtrack: its literals (and those of its parts)
    repeated alone, glued to word characters, and chained in the rule's order."""
    from mlbench.failures.matching import needed_literals, split_gaps

    groups = [needed_literals(part, rule.regex.flags) or ("a",) for parts in split_gaps(rule.pattern) for part, _ in parts]
    units = {"a", " ", "1", "1.", " \n", "AError"}
    units |= {literal + tail for group in groups for literal in group[:2] for tail in ("", " ", "a1.", "\n")}
    units |= {" ".join(group[0] for group in groups) + " ", "".join(group[0] for group in groups)}
    return [unit * max(1, size // len(unit)) for unit in sorted(units)]


def _seconds(call, limit: float = 3.0) -> float:
    """Seconds ``call()`` took; ``limit`` + 1 when it ran past ``limit`` (``re`` checks for signals)."""
    import signal

    def expire(signum, frame):
        raise TimeoutError

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    started = time.perf_counter()
    try:
        call()
        return time.perf_counter() - started
    except TimeoutError:
        return limit + 1
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_no_rule_backtracks_on_inputs_built_from_its_own_words():
    """Every rule on 12,000-character strings of its own literals: a linear rule takes about a millisecond,
    a quadratic one seconds (12,000^2 steps). A slow try is timed again at a quarter of the size: linear
    grows about 4-fold from there, quadratic 16-fold."""
    from mlbench.failures._triage import _FLAGS, _RULES
    from mlbench.failures.causes import CAUSES
    from mlbench.failures.matching import Rule

    slow = []
    for rule in _RULES.rules + [Rule(cls, 1, pattern, _FLAGS) for cls, _, pattern, _ in CAUSES]:
        for text in _adversarial(rule):
            seconds = _seconds(lambda: sum(1 for _ in rule.finditer(text)))
            if seconds > 0.25:
                quarter = text[:len(text) // 4]
                small = _seconds(lambda: sum(1 for _ in rule.finditer(quarter)))
                if seconds > 8 * small:
                    slow.append((rule.pattern[:80], text[:30], round(small, 3), round(seconds, 3)))
    assert not slow, slow


@pytest.mark.parametrize("unit", ["a", " ", "1", "1.", "a\n", " \n", "\t", "_", "AError", "AError.", "|", "│ ", "> ", "`", "\\n",
                                  'File "a.py", line 1, in f x = g() ', "Traceback (most recent call last): ",
                                  'Missing key(s) in state_dict: "a", ', "allocate 1", "site-packages/a/", "a.so",
                                  "error: (-1:", "in function 'a", "\"loc\": [", "'loc': (", "2024-01-01T00:00:00Z AError",
                                  "torch.cuda.FloatTensor ", "No such file or directory: 'a.png' ", "^^^^ ", "download weights "])
def test_no_helper_backtracks_on_long_runs(unit):
    """Normalising, cutting into blocks, the context rules and every class's number extraction on 16,000
    characters of one repeated unit: bounded work per character (the old helpers were quadratic on
    several of these, e.g. a run of digits for the memory sizes)."""
    from mlbench.failures import numbers
    from mlbench.failures._triage import _exception_type
    from mlbench.failures.blocks import cut_blocks
    from mlbench.failures.causes import find_cause
    from mlbench.failures.library_rules import whole_input_diagnoses
    from mlbench.failures.log_formats import normalize
    from mlbench.failures.patterns import context_scores

    text = unit * (16_000 // len(unit))
    calls = {"normalize": lambda: normalize(text), "blocks": lambda: cut_blocks(text.split("\n")),
             "context": lambda: context_scores(text, "ValueError"), "type": lambda: _exception_type(text.split("\n")),
             "whole": lambda: whole_input_diagnoses(text, lambda *args: args),
             **{cls: (lambda cls: lambda: numbers.extract(cls, text))(cls) for cls in FAILURE_CLASSES},
             **{f"cause of {cls}": (lambda cls: lambda: find_cause(cls, text))(cls) for cls in FAILURE_CLASSES}}
    slow = {name: seconds for name, call in calls.items() if (seconds := _seconds(call)) > 1.0}
    assert not slow, slow


def _check_rules(rules, blocks: list[str]) -> None:
    """Each of ``rules``: never skipped by the pre-filter in a block where it matches, and, matched part by
    part, the matches of its regular expression."""
    from bisect import bisect_right

    from mlbench.failures._triage import _RULES

    joined = "\n\x00\x00\x00\x00\n".join(blocks)  # blocks apart: a match holding a NUL spans two and is not checked
    starts = [0]
    for block in blocks[:-1]:
        starts.append(starts[-1] + len(block) + 6)
    allowed = [{id(rule) for rule in candidates} for candidates in _RULES.candidates(blocks)]
    for rule in rules:
        expected = [(m.start(), m.end()) for m in rule.regex.finditer(joined)]
        for start, end in expected:
            assert "\x00" in joined[start:end] or id(rule) in allowed[bisect_right(starts, start) - 1], \
                (rule.pattern, joined[start - 50:start + 100])
        if rule._chains:
            assert [(m.start(), m.end()) for m in rule.finditer(joined)] == expected, rule.pattern


def test_the_prefilter_and_the_part_by_part_rules_give_the_regex_matches():
    """On the blocks of the labelled corpus: a rule the literal pre-filter skips for a block never matches
    in it, and the rules matched part by part give the matches of their regular expression; each of
    those also on strings that put its parts at the edges of their gaps (199-201 characters apart, across
    a newline)."""
    import random

    from mlbench.failures._triage import _RULES
    from mlbench.failures.blocks import cut_blocks
    from mlbench.failures.log_formats import normalize
    from mlbench.failures.matching import needed_literals, split_gaps

    _check_rules(_RULES.rules, ["\n".join(block) for row in CORPUS for _, block in cut_blocks(normalize(row["text"])[0].split("\n"))])
    rng = random.Random(0)
    for rule in (r for r in _RULES.rules if r._chains):
        groups = [needed_literals(part, rule.regex.flags) for parts in split_gaps(rule.pattern) for part, _ in parts]
        words = [literal for group in groups for literal in group or ()]
        gaps = [" ", "\n", " " * 199, "x" * 200, " " * 201, ": "]
        _check_rules([rule], ["".join(rng.choice(words) + rng.choice(gaps) for _ in range(rng.randint(2, 6))) for _ in range(30)])


def _records(count: int) -> str:
    return "".join(f"2024-05-01 12:00:00,{i % 1000:03d} INFO request {i} handled in 12 ms\n" for i in range(count))


@pytest.mark.parametrize("count", [600, 5000])  # 600: read whole, more than the old 400-block limit; 5000: error lines only
def test_an_error_on_the_last_line_of_a_long_log_is_found(count, tmp_path, capsys):
    text = _records(count) + LAST + "\n"
    for source in (text, text.encode(), io.BytesIO(text.encode()), io.StringIO(text)):
        d = triage(source, casebook=False)
        assert (d.failure_class, d.line, d.input_note) == ("cuda_oom", count + 1, "")
    import argparse

    (tmp_path / "service.log").write_text(text)
    parser = argparse.ArgumentParser()
    add_triage_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["triage", str(tmp_path / "service.log")])
    assert args.run(args) == 1  # found: the old triage answered unknown and exit 0 past 400 records
    assert f"cuda_oom (line {count + 1})" in capsys.readouterr().out


def test_a_log_over_max_triage_bytes_keeps_its_head_and_tail_and_says_so(monkeypatch, tmp_path):
    from mlbench.budgets import Budgets, budgets

    assert Budgets().max_triage_bytes == 64 << 20
    monkeypatch.setenv("MLBENCH_MAX_TRIAGE_BYTES", "200000")
    assert budgets().max_triage_bytes == 200_000
    first = "ModuleNotFoundError: No module named 'cv2'\n"
    filler = "".join(f"2024-05-01 INFO step {i} ok {'.' * 60}\n" for i in range(12_000))  # about 1 MB
    text = first + filler + LAST + "\n"
    (tmp_path / "big.log").write_text(text)
    for source in (text, text.encode(), io.BytesIO(text.encode()), tmp_path / "big.log"):
        d = triage(source, casebook=False)
        assert [(x.failure_class, x.line) for x in d.all] == [("missing_dependency", 1), ("cuda_oom", 12_002)]
        note = d.input_note
        assert "over the budget max_triage_bytes = 200,000" in note and "MLBENCH_MAX_TRIAGE_BYTES" in note, note
        assert "its first 50,000 and last 150,000 were searched" in note and "from line" in note
        assert f"note: {note}" in repr(d) and d.to_dict()["input_note"] == note
    monkeypatch.delenv("MLBENCH_MAX_TRIAGE_BYTES")
    assert triage(text, casebook=False).input_note == ""  # within the default budget: all of it searched


def test_an_unknown_over_the_budget_says_what_was_not_searched(monkeypatch):
    monkeypatch.setenv("MLBENCH_MAX_TRIAGE_BYTES", "100000")
    d = triage("all went fine\n" * 30_000, casebook=False)
    assert d.failure_class == "unknown" and "were not; to search all" in d.input_note


def test_a_log_dense_with_errors_keeps_the_first_and_the_last_and_says_which_lines_were_left_out():
    lines = [f"ERROR request {chr(97 + i % 26)}{chr(97 + i // 26 % 26)}{chr(97 + i // 676 % 26)} failed: bad input"
             for i in range(20_000)]
    d = triage("ModuleNotFoundError: No module named 'cv2'\n" + "\n".join(lines) + "\n" + LAST + "\n", casebook=False)
    assert [x.failure_class for x in d.all][:2] == ["missing_dependency", "cuda_oom"]
    assert next(x.line for x in d.all if x.failure_class == "cuda_oom") == 20_002
    assert "the error lines from line" in d.input_note and "were not diagnosed" in d.input_note


def test_a_huge_traceback_is_read_by_its_ends():
    """A recursion traceback of 20,000 frames: the rules read its first and last lines (the message)."""
    frames = "".join(f'  File "/srv/app/m.py", line {i}, in f\n    return f(x)\n' for i in range(20_000))
    d = triage("Traceback (most recent call last):\n" + frames + LAST, casebook=False)
    assert (d.failure_class, d.line) == ("cuda_oom", 40_002)


@pytest.mark.parametrize("text, expected, cause, says", [
    ("requests.exceptions.ConnectionError: HTTPConnectionPool(host='localhost', port=8000): Max retries exceeded with url: "
     "/api/segment (Caused by NewConnectionError('<urllib3.connection.HTTPConnection object at 0x7f0>: Failed to establish "
     "a new connection: [Errno 111] Connection refused'))", "queue_timeout", "nothing_listening", "nothing is listening"),
    ("httpx.ConnectError: [Errno -2] Name or service not known", "queue_timeout", "name_resolution", "does not resolve"),
    ("requests.exceptions.SSLError: HTTPSConnectionPool(host='seg.example.org', port=443): Max retries exceeded with url: "
     "/segment (Caused by SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     "failed: self-signed certificate in certificate chain (_ssl.c:1006)')))", "queue_timeout", "tls", "CA bundle"),
    ("RuntimeError: CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously reported at some "
     "other API call, so the stacktrace below might be incorrect.", "device_mismatch", "asynchronous_kernel_error",
     "CUDA_LAUNCH_BLOCKING=1"),
    ("RuntimeError: cuDNN error: CUDNN_STATUS_NOT_INITIALIZED", "device_mismatch", "library_handle", "nearly) full"),
    ("RuntimeError: unable to write to file </torch_18_1234567>: No space left on device (28)", "cuda_oom",
     "shared_memory", "--shm-size"),
    ("OSError: [Errno 28] No space left on device: '/srv/app/out/masks/0001.png'", "device_mismatch", "disk_full",
     "df -h"),
    ('  File "train.py", line 88, in <module>\n    torch.save(model.state_dict(), "checkpoints/model.pth")\nRuntimeError: '
     "[enforce fail at inline_container.cc:445] . PytorchStreamWriter failed writing file data/0: file write failed",
     "device_mismatch", "disk_full", "df -h"),
    ("RuntimeError: [enforce fail at inline_container.cc:337] . unexpected pos 94784 vs 94672", "device_mismatch",
     "disk_full", "df -h"),
    ("RuntimeError: unable to open shared memory object </torch_2104_3614220442_1> in read-write mode: Too many open "
     "files (24)", "cuda_oom", "file_descriptors", "set_sharing_strategy('file_system')"),
    ("$ python segment.py big.tif\nKilled\n", "cuda_oom", "killed_by_host", "OOM killer"),
    ("RuntimeError: PytorchStreamReader failed locating file constants.pkl: file not found", "weights_mismatch",
     "not_torchscript", "torch.load(path"),
    ("RuntimeError: PytorchStreamReader failed locating file data.pkl: file not found", "weights_missing",
     "not_a_torch_archive", "mb.check_weights(path)"),
    ("RuntimeError: \"slow_conv2d_cpu\" not implemented for 'Half'", "dtype_mismatch", "half_on_cpu", "float32"),
    ("ValueError: Expected more than 1 value per channel when training, got input size torch.Size([1, 256, 1, 1])",
     "shape_mismatch", "map_of_one_pixel", "model.eval()"),
    ("IndexError: tensors used as indices must be long, int, byte or bool tensors", "dtype_mismatch", "index_type",
     ".long()"),
    ("RuntimeError: Invalid magic number; corrupt file?", "weights_missing", None, "sha256"),
    ("mlbench.errors.WeightsError: best.pth: 1 tensor(s) hold NaN or Inf, e.g. downs.2.conv1.weight (147 values): the "
     "training diverged; use an earlier checkpoint", "nan_output", "nonfinite_weights", "load an earlier checkpoint"),
    ("RuntimeError: Cannot use ``weights_only=True`` with TorchScript archives passed to ``torch.load``.",
     "weights_mismatch", "torchscript_archive", ".state_dict(), 'weights.pth')"),
    ("mlbench.errors.ImageError: <bytes>: not a recognised image (PNG, JPEG, TIFF, BMP, GIF, WebP); it is a Git LFS "
     "pointer, not the image: run git lfs pull in its repository", "image_format", "other_kind_of_file",
     "mb.check_image(path)"),
    ("WARNING: Job failed: exit code 137", "cuda_oom", "killed_by_host", "OOM killer"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 23.69 GiB",
     "cuda_oom", None, "mb.predict_tiled"),
    ('  File "/opt/conda/lib/python3.10/site-packages/torch/cuda/__init__.py", line 289, in _lazy_init\n    raise '
     'AssertionError("Torch not compiled with CUDA enabled")\nAssertionError: Torch not compiled with CUDA enabled',
     "device_mismatch", "cpu_only_torch", "CPU-only build"),
    ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA GPU and installed a "
     "driver from http://www.nvidia.com/Download/index.aspx", "device_mismatch", "no_gpu_driver", "--gpus all"),
    ("RuntimeError: The NVIDIA driver on your system is too old (found version 11040).", "device_mismatch",
     "driver_too_old", "update the driver"),
    ('RuntimeError: Error(s) in loading state_dict for UNet:\n\tMissing key(s) in state_dict: "inc.conv.0.weight", '
     '"inc.conv.0.bias".\n\tUnexpected key(s) in state_dict: "epoch", "state_dict", "optimizer".', "weights_mismatch",
     "wrapped_checkpoint", "ckpt['state_dict']"),
    ("_pickle.UnpicklingError: Weights only load failed. WeightsUnpickler error: Unsupported class "
     "numpy.core.multiarray._reconstruct", "weights_mismatch", None, "safe_globals([numpy.core.multiarray._reconstruct])"),
    ("_pickle.UnpicklingError: Weights only load failed. WeightsUnpickler error: Unsupported global: GLOBAL "
     "numpy.core.multiarray._reconstruct was not an allowed global by default.", "weights_mismatch", None,
     "safe_globals([numpy.core.multiarray._reconstruct])"),
    ("RuntimeError: expected scalar type Long but found Float", "dtype_mismatch", "long_expected", "target.long()"),
    ("TypeError: Cannot handle this data type: (1, 1, 3), <f4", "dtype_mismatch", "array_to_image", ".astype(np.uint8)"),
    ("ValueError: zero-size array to reduction operation maximum which has no identity", "shape_mismatch", "empty_array",
     "mask.any()"),
    ("RuntimeError: Given groups=1, weight of size [64, 3, 3, 3], expected input[1, 512, 512, 3] to have 3 channels, "
     "but got 512 channels instead", "shape_mismatch", "channels_last_input", "x.permute(0, 3, 1, 2)"),
    ("OSError: cannot write mode RGBA as JPEG", "image_format", "save_mode", "convert('RGB')"),
    ("ValueError: TiffPage 0: <COMPRESSION.LZW: 5> requires the 'imagecodecs' package", "missing_dependency",
     "tiff_codec", "pip install imagecodecs"),
    ("ValueError: cannot decompress LZW", "image_format", "tiff_codec", "pip install imagecodecs"),
    ("ImportError: libgthread-2.0.so.0: cannot open shared object file: No such file or directory", "missing_dependency",
     "system_library", "libglib2.0-0"),
    ('{"error":"Model acme/cell-seg is currently loading","estimated_time":20.0}', "queue_timeout", "model_loading",
     "wait the estimated time"),
    ("<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n<center><h1>413 Request Entity "
     "Too Large</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>", "validation_error",
     "proxy_body_limit", "client_max_body_size"),
    ("UserWarning: Clipping input data to the valid range for imshow with RGB data ([0..1] for floats or [0..255] for "
     "integers). Got range [-2.1179039..2.64].", "normalization", "display_clipping", "x * std + mean"),
    ("---------------------------------------------------------------------------\nValueError                    "
     "            Traceback (most recent call last)\nCell In[4], line 3\n      1 mask = (probs > 0.5).astype(np.uint8)\n"
     "----> 3 contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)\n\nValueError: too many "
     "values to unpack (expected 2)", "postprocessing", "findcontours_returns", "[-2:]"),
])
def test_a_named_cause_gets_its_own_fix(text, expected, cause, says):
    """Where the text names a cause that the class's usual fix would get wrong (nothing listening, an asynchronous
    kernel error, a full disk or /dev/shm), the fix is that cause's; otherwise the class's."""
    d = triage(text, casebook=False)
    assert (d.failure_class, d.numbers.get("cause")) == (expected, cause), d
    assert says in d.fix, d.fix


def test_a_cause_needs_its_own_words():
    """"device-side assertions" in torch's hint under every CUDA error is not a device-side assert, nor a docker
    ``OOMKilled:false`` an OOM kill."""
    hint = ("RuntimeError: CUDA error: no kernel image is available for execution on the device\nCUDA kernel errors might "
            "be asynchronously reported at some other API call\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side "
            "assertions.")
    assert triage(hint, casebook=False).numbers.get("cause") == "no_kernel_for_gpu"
    warned = ("UserWarning:\nNVIDIA RTX A6000 with CUDA capability sm_86 is not compatible with the current PyTorch "
              "installation.\nThe current PyTorch install supports CUDA capabilities sm_37 sm_50 sm_60 sm_70.\n"
              "RuntimeError: CUDA error: no kernel image is available for execution on the device")
    assert "supports sm_86" in triage(warned, casebook=False).fix  # the capability from the warning's line
    assert triage('"State": {"OOMKilled": false, "Error": "CUDA out of memory"}', casebook=False).numbers.get("cause") is None


def test_sizes_that_differ_by_a_factor_are_not_blamed_on_the_downsampling():
    """A skip connection off by a pixel says "multiples of 16"; a doubled batch or sequence (4015 vs 8030) does not."""
    off = triage("RuntimeError: The size of tensor a (63) must match the size of tensor b (62) at non-singleton "
                 "dimension 3", casebook=False)
    doubled = triage("RuntimeError: The size of tensor a (4015) must match the size of tensor b (8030) at non-singleton "
                     "dimension 1", casebook=False)
    assert "multiples of 16" in off.fix and "downsampling" in off.explanation
    assert "multiples of 16" not in doubled.fix.replace("multiples of 16/32", "") and "downsampling" not in doubled.explanation
    assert "size 4015 vs 8030 at dimension 1" in doubled.explanation


def test_a_pretty_printed_422_names_its_field():
    body = '{\n  "detail": [\n    {\n      "loc": [\n        "body",\n        "file"\n      ],\n      "msg": "field required"\n    }\n  ]\n}'
    d = triage("HTTP/1.1 422 Unprocessable Entity\n" + body, casebook=False)
    assert (d.failure_class, d.numbers["status"], d.numbers["fields"]) == ("validation_error", 422, ["body,file"])


# ---- round 6: threads found by symptom, in other wordings (Windows, musl, MPS, NCCL, curl -v, locales) -----------
REAL6 = _load("triage_real6")


def test_real_set_round6_is_new_labelled_and_sourced():
    assert len(REAL6) >= 80
    _assert_new_and_sourced(REAL6, REAL + REAL2 + REAL3 + REAL4 + REAL5 + CORPUS)


def test_real_issue_texts_round6_accuracy():
    _assert_accurate_with_held_out_third(REAL6)


@pytest.mark.parametrize("text, expected, cause, says", [
    ('OSError: [WinError 1455] The paging file is too small for this operation to complete. Error loading '
     '"C:\\env\\lib\\site-packages\\torch\\lib\\cudnn_cnn_infer64_8.dll" or one of its dependencies.',
     "cuda_oom", "windows_paging_file", "paging file"),
    ('OSError: [WinError 1455] 页面文件太小，无法完成操作。 Error loading "D:\\a\\torch\\lib\\cublas64_11.dll"',
     "cuda_oom", "windows_paging_file", "paging file"),
    ('OSError: [WinError 126] The specified module could not be found. Error loading '
     '"C:\\Python310\\lib\\site-packages\\torch\\lib\\c10.dll" or one of its dependencies.',
     "missing_dependency", "windows_dll", "Visual C++ Redistributable"),
    ("NotImplementedError: The operator 'aten::roll' is not currently implemented for the MPS device. As a temporary fix, "
     "you can set the environment variable", "device_mismatch", "mps_missing_op", "PYTORCH_ENABLE_MPS_FALLBACK=1"),
    ("RuntimeError: NCCL error in: /opt/conda/ProcessGroupNCCL.cpp:518, unhandled system error, NCCL version 2.7.8",
     "device_mismatch", "nccl", "NCCL_DEBUG=INFO"),
    ("Error loading shared library libGL.so.1: No such file or directory (needed by /usr/bin/app)",
     "missing_dependency", "system_library", "libgl1"),
])
def test_causes_in_other_wordings_get_their_own_fix_and_account(text, expected, cause, says):
    """The cause's fix, and its account of what happened in place of the class's most common one."""
    d = triage(text, casebook=False)
    assert (d.failure_class, d.numbers.get("cause")) == (expected, cause)
    assert says in d.fix and "pip install" not in d.fix


def test_a_full_disk_is_not_explained_as_a_device():
    d = triage("safetensors_rust.SafetensorError: Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
               "message: \"No space left on device\" })", casebook=False)
    assert d.numbers["cause"] == "disk_full" and "a disk is full" in d.explanation
    assert "different devices" not in d.explanation


def test_small_size_pairs_read_as_channels_and_the_final_http_status():
    rgba = triage("RuntimeError: The size of tensor a (4) must match the size of tensor b (3) at non-singleton dimension 0",
                  casebook=False)
    assert "RGBA" in rgba.explanation and "multiple of" not in rgba.fix and "convert('RGB')" in rgba.fix
    skip = triage("RuntimeError: The size of tensor a (64) must match the size of tensor b (63) at non-singleton dimension 3",
                  casebook=False)
    assert "multiples of 16" in skip.fix
    curl = triage("> POST /predict HTTP/1.1\n< HTTP/1.1 100 Continue\n< HTTP/1.1 504 Gateway Timeout\n", casebook=False)
    assert curl.numbers["status"] == 504


def test_a_missing_submodule_is_a_version_not_a_missing_package():
    """Python names the first part of a dotted name that is missing: timm.layers missing means timm is there."""
    d = triage("ModuleNotFoundError: No module named 'timm.layers'", casebook=False)
    assert "timm is installed" in d.explanation and "version" in d.fix
    old_abi = triage("ImportError: numpy.core.multiarray failed to import", casebook=False)
    assert "None" not in old_abi.explanation and "NumPy" in old_abi.fix


def test_info_log_lines_do_not_outrank_the_error():
    text = ("2025-06-04 16:18:38,972 [INFO] normalization checked: computing saturation levels\n"
            "2025-06-04 16:18:39,000 [ERROR] RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB")
    assert triage(text, casebook=False).failure_class == "cuda_oom"


def test_a_pydantic_model_refusing_values_is_not_told_to_send_the_services_fields():
    d = triage("pydantic_core._pydantic_core.ValidationError: 3 validation errors for StationSummary\nmean\n"
               "  Input should be a valid number [type=float_type, input_value=None, input_type=NoneType]", casebook=False)
    assert d.failure_class == "validation_error" and d.numbers["cause"] == "model_validation"
    assert "multipart" not in d.fix and "Optional" in d.fix


def test_fastapis_request_model_keeps_the_request_fix_and_a_sentences_full_stop_is_no_submodule():
    request = triage("pydantic.error_wrappers.ValidationError: 1 validation error for Request\nbody -> file\n"
                     "  field required (type=value_error.missing)", casebook=False)
    assert "cause" not in request.numbers and "multipart" in request.fix
    d = triage("ModuleNotFoundError: No module named skimage.", casebook=False)
    assert d.numbers["module"] == "skimage" and "pip install scikit-image" in d.fix


@pytest.mark.parametrize("text, status", [
    ("requests.exceptions.HTTPError: 500 Server Error: Internal Server Error for url: http://localhost:8000/segment", "500"),
    ("urllib.error.HTTPError: HTTP Error 501: Not Implemented", "501"),
])
def test_a_bare_server_error_sends_the_user_to_the_servers_log(text, status):
    d = triage(text, casebook=False)
    assert d.failure_class == "unknown"
    assert f"the server answered {status}" in d.explanation and "server.log" in d.fix
    assert "server answered" not in triage("ValueError: something else", casebook=False).explanation


# ---- round 7: GUI logs, Jupyter exports, Java and R wrappers, detectron2, OpenMMLab, gRPC ---------------------------
REAL7 = _load("triage_real7")


def test_real_set_round7_is_new_labelled_and_sourced():
    assert len(REAL7) >= 80  # 84 texts
    _assert_new_and_sourced(REAL7, REAL + REAL2 + REAL3 + REAL4 + REAL5 + REAL6 + CORPUS)


def test_real_issue_texts_round7_accuracy():
    _assert_accurate_with_held_out_third(REAL7)


@pytest.mark.parametrize("text, expected, cause, says", [
    ("GUI_INFO: normalization checked: computing saturation levels\n{'normalize': True, 'norm3D': True}\n"
     "ERROR: 'weights_only' is an invalid keyword argument for Unpickler()", "missing_dependency", None, "version"),
    ('AssertionError: Checkpoint /data/models/model_final.pkl not found!', "weights_missing", None, ""),
    ("KeyError: 'EncoderDecoderX is not in the models registry'", "missing_dependency", "registry", "custom_imports"),
    ("RuntimeError: No such operator image::decode_jpeg", "missing_dependency", None, ""),
    ("tritonclient.utils.InferenceServerException: [StatusCode.UNAVAILABLE] failed to connect to all addresses",
     "queue_timeout", "nothing_listening", "nothing is listening"),
    ("cv2.error: OpenCV(4.1.0) convhull.cpp:137: error: (-215:Assertion failed) total >= 0 && (depth == CV_32F || "
     "depth == CV_32S) in function 'cv::convexHull'", "postprocessing", None, ""),
    ("Could not load library libcudnn_ops_infer.so.8. Error: libcudnn_ops_infer.so.8: cannot open shared object file: "
     "No such file or directory", "missing_dependency", "cuda_library", "LD_LIBRARY_PATH"),
    ("[2022-09-14 15:26:39 +0000] [7] [CRITICAL] WORKER TIMEOUT (pid:8)", "queue_timeout", "worker_timeout", "--preload"),
    ("ConnectionResetError: [Errno 104] Connection reset by peer", "queue_timeout", "connection_reset", "server's log"),
    ("[shapely.geos][ERROR] - TopologyException: Input geom 1 is invalid: Self-intersection at or near point 220 235",
     "postprocessing", "invalid_geometry", "make_valid"),
    ("RuntimeError: Unsupported image file. Only jpeg and png are currently supported.", "image_format", None, ""),
])
def test_round7_wordings_and_causes(text, expected, cause, says):
    d = triage(text, casebook=False)
    assert (d.failure_class, d.numbers.get("cause")) == (expected, cause)
    assert says in d.fix


def test_an_oom_with_plenty_free_is_not_blamed_on_the_models_size_and_sizes_print_plainly():
    d = triage("torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 MiB. GPU 7 has a total capacity of "
               "287.98 GiB of which 203.49 GiB is free.", casebook=False)
    assert d.failure_class == "cuda_oom" and "fragmented" in d.fix and "expandable_segments" in d.fix
    tight = triage("RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 7.79 GiB total capacity; "
                   "1.10 GiB free)", casebook=False)
    assert "fragmented" not in tight.fix
    big = triage("RuntimeError: [enforce fail at alloc_cpu.cpp:81] data. DefaultCPUAllocator: not enough memory: "
                 "you tried to allocate 1069547520 bytes.", casebook=False)
    assert "e+" not in big.explanation


# ---- round 8: ONNX Runtime and TensorRT, Java hosts (QuPath, DJL), SageMaker and Triton, chained and localised ---------
REAL8 = _load("triage_real8")


def test_real_set_round8_is_new_labelled_and_sourced():
    assert len(REAL8) >= 75  # 77 texts
    _assert_new_and_sourced(REAL8, REAL + REAL2 + REAL3 + REAL4 + REAL5 + REAL6 + REAL7 + CORPUS)


def test_real_issue_texts_round8_accuracy():
    _assert_accurate_with_held_out_third(REAL8)


@pytest.mark.parametrize("text, expected, cause", [
    ('[E:onnxruntime:Default, provider_bridge_ort.cc:1744 TryGetProviderInfo_CUDA] LoadLibrary failed with error 126 "" '
     'when trying to load "C:\\ort\\onnxruntime_providers_cuda.dll"', "missing_dependency", "onnxruntime_provider"),
    ("[TRT] [E] 1: [stdArchiveReader.cpp::StdArchiveReader::40] Error Code 1: Serialization (Serialization assertion "
     "stdVersionRead == serializationVersion failed.Version tag does not match.)", "missing_dependency", "tensorrt_engine"),
    ("RuntimeError: CUDA failure 700: an illegal memory access was encountered ; GPU=0", "device_mismatch",
     "asynchronous_kernel_error"),
    ("java.lang.NoSuchMethodError: 'qupath.lib.roi.interfaces.ROI qupath.lib.roi.ROIs.createRectangle(double, double, "
     "double, double)'\n    at qupath.ext.stardist.StarDist2D.detectObjects(StarDist2D.java:598)", "missing_dependency",
     "jvm_extension"),
    ("E0423 model_repository_manager.cc:1234] failed to load 'cellseg' version 1: Internal: no version is available",
     "weights_missing", "model_repository"),
    ("onnxruntime.capi.onnxruntime_pybind11_state.InvalidArgument: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid "
     "dimensions for input: images for the following indices\n index: 2 Got: 480 Expected: 640", "shape_mismatch",
     "fixed_input_size"),
])
def test_round8_runtimes_and_their_causes(text, expected, cause):
    d = triage(text, casebook=False)
    assert (d.failure_class, d.numbers.get("cause")) == (expected, cause)
    assert "pip install" not in d.fix or cause == "onnxruntime_provider"


def test_hint_words_in_frames_do_not_outvote_a_message_that_says_what_failed():
    text = ('Traceback (most recent call last):\n  File "/srv/app/load.py", line 469, in load\n'
            '    session = ort.InferenceSession(path)\n'
            "onnxruntime.capi.onnxruntime_pybind11_state.NoSuchFile: [ONNXRuntimeError] : 3 : NO_SUCHFILE : Load model "
            "from model.onnx failed:Load model model.onnx failed. File doesn't exist")
    assert triage(text, casebook=False).failure_class == "weights_missing"
    werkzeug = ("500 Internal Server Error: The server encountered an internal error and was unable to complete your "
                "request. Either the server is overloaded or there is an error in the application.")
    assert triage(werkzeug, casebook=False).failure_class == "unknown"
