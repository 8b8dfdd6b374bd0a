"""``mb.ServiceClient`` and the explanations of every error answer (canned and live)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import mlbench as mb
from mlbench.client.service_client import BatchResult, SegmentResult, ServiceClient, ServiceError, encode_image
from mlbench.client.explain import explain_error, explain_success, retry_after_of
from mlbench.service import ServiceSettings, create_app
from mlbench.service.fakes import BrightModel, SlowModel, make_png

torch.set_num_threads(1)
PNG = make_png(96)


@pytest.fixture(scope="module")
def client():
    settings = ServiceSettings(models={"hrnet": BrightModel(), "slow": SlowModel(2.0, steps=40)},
                               options={"input_size": 64}, timeout_s=0.3, max_pixels=150 * 150, warmup=False)
    with ServiceClient(create_app(settings), timeout=30) as c:
        yield c


def test_encode_image_accepts_paths_bytes_and_arrays(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(PNG)
    assert encode_image(path) == ("x.png", PNG)
    assert encode_image(PNG)[0] == "image.png"
    name, data = encode_image(np.zeros((8, 8), np.uint16))
    assert name == "image.png" and mb.read_image(data)[0].dtype == np.uint16
    name, data = encode_image(np.zeros((8, 8, 3), np.float32))
    assert name == "image.tiff" and mb.read_image(data)[0].dtype == np.float32  # .tif fails the real allow-list
    with pytest.raises(mb.OptionsError, match="must be a path, bytes or a numpy array, got list"):
        encode_image([1, 2])


def test_client_health_models_and_segment(client):
    health = client.health()
    assert health["models_loaded"] == 2 and health["models"] == ["hrnet", "slow"]  # a count, as served; ids: fixed
    assert set(client.models()) == {"hrnet", "slow"}
    result = client.segment(PNG, model="hrnet", threshold=0.4, detect_holes=False)
    assert isinstance(result, SegmentResult) and result.threshold_used == 0.4 and result.warnings == ()
    assert (result.width, result.height) == (96, 96) and result.polygons
    assert "SegmentResult(hrnet, 96x96, threshold 0.4" in repr(result)
    mask = result.to_mask()
    assert mask.shape == (96, 96) and 0 < mask.mean() < 1
    assert client.ready()[0] and client.metrics()["completed"] >= 1


def test_client_errors_become_explanations(client):
    with pytest.raises(ServiceError, match="field 'threshold'.*you sent threshold=0.05") as err:
        client.segment(PNG, threshold=0.05)
    assert err.value.status == 422 and err.value.sent["threshold"] == 0.05
    with pytest.raises(ServiceError, match=r"200x200 = 40,000 pixels and the service accepts at most 22,500"):
        client.segment(make_png(200))
    with pytest.raises(ServiceError, match="model 'slow' did not finish this 96x96 image within 0.3 s") as err:
        client.segment(PNG, model="slow")
    assert err.value.code == "inference_timeout" and err.value.request_id.startswith("req-")
    cut = PNG[: len(PNG) // 2]
    with pytest.raises(ServiceError, match=rf"you sent the file 'cut.png' \({len(cut):,} bytes\)") as err:
        client.segment(cut, filename="cut.png")
    assert err.value.code == "image_error" and "no 'file'" not in str(err.value)


def test_batch_segment_parses_each_file_and_explains_each_failure(client):
    batch = client.batch_segment([PNG, b"hello", make_png(200), np.zeros((64, 64), np.uint8)], model="hrnet",
                                 threshold=0.4)
    assert isinstance(batch, BatchResult) and not batch.ok
    assert batch.filenames == ("image_0.png", "image_1.bin", "image_2.png", "image_3.png")
    assert set(batch.results) == {"image_0.png", "image_3.png"} and batch.results["image_0.png"].threshold_used == 0.4
    flat = batch.results["image_3.png"]  # a flat image: logits 0, probability 0.5 > 0.4 everywhere
    assert (flat.width, flat.height) == (64, 64) and flat.to_mask().all() and batch.results["image_0.png"].polygons
    text, pixels = batch.errors["image_1.bin"], batch.errors["image_2.png"]
    assert text.status == 415 and text.code == "unsupported_type" and text.sent["filename"] == "image_1.bin"
    assert str(text).startswith("415: the upload is not an image") and text.sent["batch_index"] == 1
    assert pixels.status == 413 and "200x200 = 40,000 pixels and the service accepts at most 22,500" in str(pixels)
    assert pixels.request_id.startswith("req-") and pixels.code == "too_many_pixels"
    assert repr(batch).splitlines()[0] == "BatchResult: 2 of 4 file(s) segmented"
    assert "- image_1.bin: 415: the upload is not an image" in repr(batch) and batch.to_dict()["batch_size"] == 4
    assert batch.warnings == ()


def test_batch_segment_refusals_of_the_whole_request(client):
    with pytest.raises(ServiceError, match="413: 9 files in one batch, the limit is 8. Fix: split the batch"):
        client.batch_segment([PNG] * 9)
    with pytest.raises(ServiceError, match="field 'threshold'.*you sent threshold=0.95"):
        client.batch_segment([PNG], threshold=0.95)
    with pytest.raises(mb.OptionsError, match="images is an empty list"):
        client.batch_segment([])
    with pytest.raises(mb.OptionsError, match="got a single bytes; wrap it in a list"):
        client.batch_segment(PNG)


def test_explanations_of_bare_real_service_answers():
    tif = explain_error(400, {"detail": "Invalid file type. Allowed types: .png, .jpg, .jpeg, .bmp"},
                        sent={"filename": "cells.tif"})
    assert "refused 'cells.tif': its extension '.tif' is not in its allow-list (.png .jpg .jpeg .bmp)" in tif
    assert "Neither '.tif' nor '.tiff' passes" in tif
    assert "(5,000,000 bytes) is larger than the service's body size limit" in explain_error(
        413, "Content Too Large", sent={"body_bytes": 5_000_000})
    missing = explain_error(422, {"detail": [{"type": "missing", "loc": ["body", "file"], "msg": "Field required",
                                              "input": None}]}, sent={"threshold": 0.3})
    assert "the request had no 'file' field" in missing and "multipart file field named 'file'" in missing
    decode = explain_error(422, {"detail": "the image cannot be decoded", "error": "image_error", "errors": [
        {"type": "image_error", "loc": ["body", "file"], "msg": "the image cannot be decoded", "input": "upload"}]},
        sent={"filename": "cut.png", "file_bytes": 812})
    assert "you sent the file 'cut.png' (812 bytes)" in decode and "no 'file'" not in decode
    assert "Fix: the file arrived but its content is refused" in decode
    busy = explain_error(429, {"detail": "x", "error": "queue_full", "queue_depth": 8, "queue_size": 8},
                         {"retry-after": "3"})
    assert "queue is full (8 of 8 waiting)" in busy and "retry after 3 s" in busy
    assert "keeps the forward running" in explain_error(504, {"detail": "Inference timeout"})
    assert "has no model 'unet' and did not list its models" in explain_error(500, {"detail": "Model unet not found"})
    assert "answers 500 for an unknown model" in explain_error(500, {"detail": "Segmentation failed: CUDA error"})
    assert "inference timed out after 60 s" in explain_error(504, {"detail": {"error": "Model inference timeout",
                                                                              "message": "x", "timeout": 60}})
    assert retry_after_of({}, {"retry_after_s": 4}) == 4.0 and retry_after_of({}, "text") is None


def test_explain_success_flags_ignored_query_parameters():
    body = {"threshold_used": 0.5, "model_used": "hrnet", "polygons": []}
    notes = explain_success(body, {"threshold": 0.8, "model": "resunet_small"})
    assert len(notes) == 3 and "asked threshold=0.8 but the service used 0.5" in notes[0]
    assert notes[2].startswith("no polygons in this answer (at threshold 0.5")
    assert explain_success({**body, "warning": "No polygons detected"}, {})[-1] == "No polygons detected"
    assert explain_success({"model_used": "resunet_small"}, {"model": "cbam_resunet"}) == []


def test_explain_raw_response(client):
    response = client.http.post("/api/v1/segment", params={"threshold": 0.8}, files={"file": ("a.png", PNG)})
    text = client.explain(response, sent={"threshold": 0.8})
    assert text.startswith("200: OK") and "asked threshold=0.8 but the service used 0.5" in text
    missing = client.http.post("/api/v1/segment", data={"threshold": "0.3"})
    assert "the request had no 'file' field" in client.explain(missing, sent={"threshold": 0.3})
    assert repr(client) == "ServiceClient(in-process app)"


def test_client_against_a_live_url():
    from mlbench.service import serve_in_thread

    settings = ServiceSettings(models={"hrnet": BrightModel()}, warmup=False, options={"input_size": 64})
    with serve_in_thread(create_app(settings)) as server, ServiceClient(server.url) as live:
        assert live.segment(io.BytesIO(PNG).getvalue()).model_used == "hrnet"
        batch = live.batch_segment([PNG, PNG])
        assert batch.ok and [r.model_used for r in batch.results.values()] == ["hrnet", "hrnet"]
        assert repr(live) == f"ServiceClient({server.url})"
    with pytest.raises(mb.OptionsError, match="not a loopback address"):
        serve_in_thread(create_app(settings), host="0.0.0.0")


def test_client_against_the_as_served_preset(tmp_path):
    """The historic preset answers in the real service's words; the client explains them the same way."""
    settings = ServiceSettings.as_served(models={"hrnet": BrightModel()}, options={"input_size": 64})
    (tmp_path / "cells.png").write_bytes(PNG)
    (tmp_path / "page.png").write_bytes(b"<!DOCTYPE html>\n<html><body>502 Bad Gateway</body></html>")
    with ServiceClient(create_app(settings), timeout=30) as served:
        result = served.segment(PNG, filename="cells.png", model="hrnet", threshold=0.4)
        assert result.model_used == "hrnet" and result.threshold_used == 0.4 and result.to_mask().any()
        with pytest.raises(ServiceError, match=r"refused 'cells.tif' \(\d[\d,]* bytes\): its extension '.tif'") as err:
            served.segment(PNG, filename="cells.tif")
        assert err.value.status == 400 and err.value.code == "extension_not_allowed"
        with pytest.raises(ServiceError, match="has no model 'unet'") as err:
            served.segment(PNG, filename="cells.png", model="unet")
        assert err.value.code == "unknown_model"
        with pytest.raises(ServiceError, match=r"is cut short \(truncated\)") as err:
            served.segment(PNG[: len(PNG) // 2], filename="cut.png")
        assert err.value.code == "image_error"
        batch = served.batch_segment([tmp_path / "cells.png", tmp_path / "page.png"])
        assert list(batch.results) == ["cells.png"] and batch.errors["page.png"].code == "image_error"
        assert "starts with `<!DOCTYPE html>`, so it is an HTML page" in str(batch.errors["page.png"])
        assert batch.warnings == ()


class _Socket:
    """A loopback TCP server that accepts and then does ``behaviour``: nothing (no answer), or close at once."""

    def __init__(self, behaviour: str) -> None:
        import socket
        import threading

        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        self.behaviour, self.held = behaviour, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            connection.recv(65536)
            if self.behaviour == "close":
                connection.close()
            else:
                self.held.append(connection)

    def stop(self) -> None:
        self.server.close()
        for connection in self.held:
            connection.close()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("where, code, says", [
    ("refused", "connection_refused", "nothing is listening at http://127.0.0.1:"),
    ("silent", "client_timeout", "sent no answer within this client's timeout of 0.5 s"),
    ("close", "connection_lost", "closed the connection without an answer"),
    ("http://no-such-host.invalid:8000", "name_not_resolved", "does not resolve"),
])
def test_a_request_that_gets_no_answer_is_a_service_error_that_says_why(where, code, says):
    """No HTTP answer (nothing listening, no answer in time, the worker died mid-request, an unknown host): a
    ServiceError with status 0, a code and the fix, instead of httpx's bare '[Errno 111] Connection refused'."""
    server = _Socket(where) if where in ("silent", "close") else None
    url = server.url if server else (f"http://127.0.0.1:{_free_port()}" if where == "refused" else where)
    try:
        with ServiceClient(url, timeout=0.5) as c, pytest.raises(ServiceError) as raised:
            c.segment(PNG, filename="cells.png")
    finally:
        if server:
            server.stop()
    error = raised.value
    assert (error.status, error.code) == (0, code) and says in str(error), str(error)
    assert error.sent["path"] == "/api/v1/segment" and error.sent["filename"] == "cells.png"


def test_an_upload_of_another_kind_is_named_by_the_service(client):
    """The service's 415 names what the upload is (here an iPhone photo) and its conversion, not its first bytes."""
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)
    with pytest.raises(ServiceError) as raised:
        client.segment(heic, filename="photo.png")
    assert raised.value.status == 415 and "it is a HEIC/HEIF photo" in str(raised.value), str(raised.value)
