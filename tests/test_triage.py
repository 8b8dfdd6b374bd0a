"""Triage: the rule base on a corpus of real-looking error texts, numbers, robustness, CLI."""

from __future__ import annotations

import io
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from mlbench.errors import OptionsError
from mlbench.triage import FAILURE_CLASSES, Diagnosis, add_triage_command, triage

CORPUS = [json.loads(line) for line in (Path(__file__).parent / "data" / "triage_corpus.jsonl").read_text().splitlines()]


def test_corpus_is_large_and_covers_every_class():
    counts = Counter(row["expected"] for row in CORPUS)
    assert len(CORPUS) >= 150
    assert set(counts) == set(FAILURE_CLASSES) - {"unknown"}
    assert min(counts.values()) >= 10


def test_corpus_accuracy_at_least_90_percent():
    wrong = [(row["expected"], triage(row["text"], casebook=False).failure_class, row["text"][:80]) for row in CORPUS
             if triage(row["text"], casebook=False).failure_class != row["expected"]]
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
    assert "requested 20.00 MiB with 16.81 MiB free of 10.76 GiB total on cuda:0" in old.explanation
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
