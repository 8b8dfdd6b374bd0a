"""``ServiceClient`` against the historic service's 44 recorded answers (the contract).

Each recorded answer is replayed through ``httpx.MockTransport``, so the client's real code
runs end to end: the request it sends is checked against the recorded one, and what it
returns, raises or explains is checked for what a user needs to act on.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

import mlbench as mb
from mlbench.client.service_client import BatchResult, SegmentResult, ServiceClient, ServiceError

RECORDED = json.loads((Path(__file__).parent / "data" / "service_api" / "recorded_seed.json").read_text())["requests"]
HTML = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The recorded uploads, under their recorded names."""
    folder = tmp_path_factory.mktemp("uploads")
    png = mb.load_sample("spheroids_8bit").path.read_bytes()
    gif = folder / "spheroids.gif"
    Image.open(mb.load_sample("spheroids_8bit").path).save(gif, format="GIF")
    data = {"spheroids_8bit.png": png, "spheroids_rgb.jpg": mb.load_sample("spheroids_rgb").path.read_bytes(),
            "spheroids_16bit.tif": mb.load_sample("spheroids_16bit").path.read_bytes(),
            "spheroids_16bit.tiff": mb.load_sample("spheroids_16bit").path.read_bytes(),
            "truncated.png": png[: len(png) // 2], "error_page.png": HTML, "empty.png": b""}
    for name, content in data.items():
        (folder / name).write_bytes(content)
    return {path.name: path for path in folder.iterdir()}


def _answer(entry: dict, body=None) -> httpx.Response:
    body = entry["body"] if body is None else body
    headers = entry.get("cors_headers") or {}
    if isinstance(body, str):
        return httpx.Response(entry["status"], text=body, headers=headers)
    return httpx.Response(entry["status"], json=body, headers=headers)


def replay(entry: dict, body=None) -> ServiceClient:
    """A client whose every request must match the recorded one and gets the recorded answer."""
    sent = entry["request"]

    def handler(request: httpx.Request) -> httpx.Response:
        assert (request.method, request.url.path) == (sent["method"], sent["path"])
        content = request.read()
        for _, name in sent.get("files", []):
            assert f'filename="{name.split(" (")[0]}"'.encode() in content
        if "model" in sent.get("form", {}):  # a form field, never the query string
            model = sent["form"]["model"].encode()
            assert b'name="model"\r\n\r\n' + model in content or content.startswith(b"model=" + model)
            assert "model" not in request.url.params
        return _answer(entry, body)

    return ServiceClient("http://service.test", transport=httpx.MockTransport(handler))


def send(entry: dict, files: dict[str, Path], body=None):
    """Send the recorded request the way a user would; the result, the ServiceError, or the explanation."""
    req = entry["request"]
    form, client = req.get("form", {}), replay(entry, body)
    options = {"model": form.get("model"), "threshold": float(form.get("threshold", 0.5)),
               "detect_holes": form.get("detect_holes", "true") == "true"}
    names = [name.split(" (")[0] for _, name in req.get("files", [])]
    try:
        if req["path"] == "/api/v1/segment" and names and not req.get("query"):
            return client.segment(files[names[0]], filename=names[0], **options)
        if req["path"] == "/api/v1/batch-segment":
            return client.batch_segment([files[name] for name in names], **options)
        if req["path"] == "/readyz":
            return client.ready()
        upload = {"file": (names[0], files[names[0]].read_bytes())} if names else None
        response = client.http.request(req["method"], req["path"], params=req.get("query"), json=req.get("json"),
                                       headers=req.get("headers"), data=form or None, files=upload)
        return client.explain(response, {**form, **req.get("query", {})})
    except ServiceError as err:
        return err
    finally:
        client.close()


def outcome_text(outcome) -> str:
    if isinstance(outcome, ServiceError):
        return f"code={outcome.code} | {outcome}"
    if isinstance(outcome, BatchResult):
        return repr(outcome) + "".join(f"\ncode={e.code} | {e}" for e in outcome.errors.values())
    return repr(outcome) if isinstance(outcome, SegmentResult) else str(outcome)


OK = [r"^200: OK$"]
EXPECT = {
    "R01 GET /": OK, "R02 GET /health": OK, "R03 GET /api/v1/health": OK, "R04 GET /api/v1/models": OK,
    "R05 GET /api/v1/status": OK, "R07 OPTIONS /api/v1/segment": OK, "R26 POST /api/calculate-metrics": OK,
    "R27 GET /api/v1/monitoring/gpu/status": OK, "R28 GET /openapi.json": OK,
    "R06 GET /api/v1/segment/task-1": [r"^501: ", "no asynchronous task API", r"synchronous route POST /api/v1/segment"],
    "R08 segment png default model": [r"SegmentResult\(hrnet, 512x512, threshold 0.5, 2 polygon", "warnings: none"],
    "R09 segment jpg resunet_advanced": [r"SegmentResult\(resunet_advanced, 640x480", "warnings: none"],
    "R10 segment png resunet_advanced detect_holes=false": [r"SegmentResult\(resunet_advanced, 512x512", "none"],
    "R11 segment .tif resunet_advanced": [
        "code=extension_not_allowed", r"^code=\S+ \| 400: ", r"refused 'spheroids_16bit.tif' \(524,544 bytes\)",
        r"extension '.tif' is not in its allow-list \(.png .jpg .jpeg .tiff .bmp\)",
        r"'.tiff' passes where '.tif' does not: the same TIFF sent as 'spheroids_16bit.tiff' is accepted"],
    "R12 segment 16-bit as .tiff resunet_advanced": [r"SegmentResult\(resunet_advanced, 512x512, threshold 0.5, "
                                                     r"2 polygon\(s\) \(1 external\), warnings: none"],
    "R13 segment .gif": ["code=extension_not_allowed", r"refused 'spheroids.gif' \(\d[\d,]* bytes\): its extension "
                         "'.gif' is not in its allow-list", r"'.tiff' passes where '.tif' does not"],
    "R14 segment threshold=5": ["code=validation_error", r"field 'threshold': Input should be less than or equal to "
                                r"0.9 \(you sent threshold=5.0; the service saw '5'; allowed: <= 0.9\)",
                                r"0.1 <= threshold <= 0.9"],
    "R15 segment unknown model unet": [
        "code=unknown_model", r"^code=\S+ \| 500: the service has no model 'unet'; it serves 'hrnet', "
        r"'resunet_advanced' \(mlbench's 'ma_resunet'\), 'resunet_small' \(mlbench's 'cbam_resunet'\)",
        r"Fix: send one of these ids as the model form field, e.g. model='hrnet'"],
    "R16 segment truncated png": ["code=image_error", r"'truncated.png' \(83,573 bytes\) is cut short \(truncated\)",
                                  "pixel data ends early"],
    "R17 segment html as .png": ["code=image_error", r"'error_page.png' \(\d+ bytes\) is not an image",
                                 r"the file starts with `<!DOCTYPE html>`, so it is an HTML page"],
    "R18 segment no file": [r"^422: 1 field", r"field 'file': Field required \(the request had no 'file' field",
                            "multipart file field named 'file'"],
    "R19 segment model/threshold in query string": [
        r"^200: OK", r"asked threshold='0.3' but the service used 0.5: it ignored the value",
        r"asked model='resunet_advanced' but the service used 'hrnet'", "silently ignores them in the query string"],
    "R20 batch 2 files resunet_advanced": [
        "code=too_many_files", r"^code=\S+ \| 400: model 'resunet_advanced' takes at most 1 image\(s\) per batch "
        "request and 2 were sent", r"split the batch into 2 requests of at most 1 file"],
    "R21 batch 1 file resunet_advanced": [r"^BatchResult: 1 of 1 file\(s\) segmented\n- spheroids_8bit.png: "
                                          r"SegmentResult\(resunet_advanced, 512x512"],
    "R22 batch png + html-as-png resunet_small": [
        r"^BatchResult: 1 of 2 file\(s\) segmented", r"- spheroids_8bit.png: SegmentResult\(.*warnings: no polygons",
        r"- error_page.png: 500: the body of 'error_page.png' \(\d+ bytes\) is not an image",
        r"code=image_error \| .*starts with `<!DOCTYPE html>`"],
    "R23 batch png + gif resunet_small": ["code=extension_not_allowed", r"refused 'spheroids.gif': its extension "
                                          "'.gif' is not in its allow-list"],
    "R24 batch unknown model": [r"^BatchResult: 0 of 1 file", r"code=unknown_model \| 500: the service has no model "
                                r"'unet'; it serves 'hrnet', 'resunet_advanced'"],
    "R25 segment empty file": ["code=empty_file", r"500: 'empty.png' is empty \(0 bytes\): nothing was uploaded"],
    "R29 GET /readyz": ["code=method_not_allowed", r"405: this service has no route GET /readyz",
                        "405 instead of 404", "use GET /health"],
    "X calculate-metrics bad body": [r"field 'contour': Input should be a valid list \(you sent contour='x'",
                                     r"\{'contour': \[\[x, y\]"],
    "X unknown path": [r"^405: this service has no route GET /api/v1/nothing"],
}
EXPECT.update({key: OK for key in RECORDED if key.startswith("X ") and key not in EXPECT})


def test_every_recorded_answer_has_an_expectation():
    assert len(RECORDED) == 44 and set(EXPECT) == set(RECORDED)


@pytest.mark.parametrize("key", sorted(RECORDED))
def test_every_recorded_answer_is_explained(key, files):
    text = outcome_text(send(RECORDED[key], files))
    for pattern in EXPECT[key]:
        assert re.search(pattern, text, re.S | re.M), f"{key}: {pattern!r} not in:\n{text}"


def test_recorded_envelopes_parse(files):
    assert set(replay(RECORDED["R04 GET /api/v1/models"]).models()) == {"hrnet", "resunet_advanced", "resunet_small"}
    assert replay(RECORDED["R02 GET /health"]).health()["models_loaded"] == 3
    tiff = send(RECORDED["R12 segment 16-bit as .tiff resunet_advanced"], files)
    assert [p.get("parent_id") for p in tiff.polygons] == [None, "polygon_1"] and tiff.to_mask().shape == (512, 512)
    batch = send(RECORDED["R21 batch 1 file resunet_advanced"], files)
    assert batch.ok and batch.warnings == () and batch.results["spheroids_8bit.png"].model_used == "resunet_advanced"


def test_failed_items_and_errors_carry_codes_and_what_was_sent(files):
    err = send(RECORDED["R16 segment truncated png"], files)
    assert (err.status, err.code, err.sent["file_bytes"], err.request_id) == (500, "image_error", 83_573, None)
    batch = send(RECORDED["R22 batch png + html-as-png resunet_small"], files)
    item = batch.errors["error_page.png"]
    assert (item.status, item.code, item.sent["batch_index"], item.sent["filename"]) == (500, "image_error", 1,
                                                                                         "error_page.png")
    assert not batch.ok and list(batch.results) == ["spheroids_8bit.png"] and batch.warnings == ()


def test_an_unknown_mlbench_name_is_mapped_to_the_service_id(files):
    entry = copy.deepcopy(RECORDED["R15 segment unknown model unet"])
    entry["request"]["form"]["model"] = "cbam_resunet"
    entry["body"]["detail"] = entry["body"]["detail"].replace("unet", "cbam_resunet", 1)
    with pytest.raises(ServiceError, match="send model='resunet_small', the service's id for mlbench's 'cbam_resunet'"):
        replay(entry).segment(files["spheroids_8bit.png"], model="cbam_resunet")


def test_a_zero_polygon_answer_surfaces_the_service_warning(files):
    entry = RECORDED["R08 segment png default model"]
    warning = "No polygons detected - image may not contain detectable cells or threshold may need adjustment"
    body = {**entry["body"], "polygons": [], "warning": warning}
    result = send(entry, files, body)
    assert result.warnings == (warning,) and f"warnings: {warning}" in repr(result)


# ---- batch pairing: never by position ----------------------------------------------------------
BATCH = RECORDED["R22 batch png + html-as-png resunet_small"]


def batch_with(files, results, **top):
    return send(BATCH, files, {**BATCH["body"], **top, "results": results})


def test_a_short_batch_answer_reports_the_missing_file(files):
    ok, failed = BATCH["body"]["results"]
    batch = batch_with(files, [failed])
    missing = batch.errors["spheroids_8bit.png"]
    assert missing.code == "missing_from_answer" and missing.status == 200
    assert "no item for 'spheroids_8bit.png' (file 0, batch_index 0); it answered 1 item(s) for 2" in str(missing)
    assert batch.errors["error_page.png"].code == "image_error" and not batch.results
    assert batch.warnings[0] == "the answer has 1 item(s) for 2 file(s) sent"
    assert any("no item for 'spheroids_8bit.png'" in w for w in batch.warnings)
    assert any("says 1 file(s) succeeded but 0 file(s) have a successful item" in w for w in batch.warnings)


def test_an_extra_batch_item_is_reported_not_attributed(files):
    ok, failed = BATCH["body"]["results"]
    stray = {**ok, "filename": "other.png", "batch_index": 2}
    unnamed = {k: v for k, v in ok.items() if k not in ("filename", "batch_index")}
    batch = batch_with(files, [ok, failed, stray, unnamed])
    assert list(batch.results) == ["spheroids_8bit.png"] and list(batch.errors) == ["error_page.png"]
    assert "answer item 2 has batch_index 2 (filename 'other.png') but 2 file(s) were sent" in repr(batch)
    assert "answer item 3 has neither filename nor batch_index" in repr(batch)
    assert batch.warnings[0] == "the answer has 4 item(s) for 2 file(s) sent"


def test_a_reordered_batch_answer_is_paired_by_index_and_reported(files):
    ok, failed = BATCH["body"]["results"]
    batch = batch_with(files, [failed, ok])
    assert list(batch.results) == ["spheroids_8bit.png"] and batch.errors["error_page.png"].code == "image_error"
    assert batch.warnings == ("the answer lists the files in another order than sent (file indexes in answer "
                              "order: [1, 0]); each item was matched by its batch_index and filename, not by position",)


def test_a_duplicated_batch_index_settles_neither_file(files):
    ok, failed = BATCH["body"]["results"]
    twin = {**failed, "filename": "spheroids_8bit.png", "batch_index": 0}
    batch = batch_with(files, [ok, twin])
    dup, missing = batch.errors["spheroids_8bit.png"], batch.errors["error_page.png"]
    assert dup.code == "duplicated_in_answer" and "2 items for 'spheroids_8bit.png'" in str(dup)
    assert "answer items [0, 1]); which one is right cannot be told" in str(dup)
    assert missing.code == "missing_from_answer" and not batch.results


def test_index_and_name_that_disagree_are_not_trusted(files):
    ok, failed = BATCH["body"]["results"]
    batch = batch_with(files, [ok, {**failed, "filename": "spheroids_8bit.png"}])
    assert ("answer item 1 has batch_index 1 and filename 'spheroids_8bit.png', but file 1 was sent as "
            "'error_page.png': the two disagree, so the item is not attributed to any file") in batch.warnings
    assert batch.errors["error_page.png"].code == "missing_from_answer"


def test_items_without_batch_index_are_paired_by_name(files):
    """mlbench's own items before batch_index: names pair them; a name sent twice pairs in order, with a warning."""
    ok = {k: v for k, v in BATCH["body"]["results"][0].items() if k != "batch_index"}
    entry = copy.deepcopy(BATCH)
    entry["request"]["files"] = [["files", "spheroids_8bit.png"], ["files", "spheroids_8bit.png"]]
    second = {**ok, "model_used": "second"}
    batch = send(entry, files, {**BATCH["body"], "successful_count": 2, "failed_count": 0, "results": [ok, second]})
    assert batch.labels == ("spheroids_8bit.png (file 0)", "spheroids_8bit.png (file 1)") and batch.ok
    assert [r.model_used for r in batch.results.values()] == ["resunet_small", "second"]
    assert "'spheroids_8bit.png' was sent 2 times and answer item 1 has no batch_index: paired with file 1" \
           in batch.warnings[1]


# ---- to_mask: islands inside holes ---------------------------------------------------------------
def rings(shape=(220, 260)) -> np.ndarray:
    """Ring, island in its hole, ring inside the island's hole, island in that (depths 0..5), a square."""
    mask = np.zeros(shape, np.uint8)
    for radius, value in ((100, 1), (84, 0), (68, 1), (52, 0), (36, 1), (22, 0), (10, 1)):
        cv2.circle(mask, (110, 110), radius, value, -1)
    cv2.rectangle(mask, (225, 20), (250, 60), 1, -1)
    return mask.astype(bool)


def served_polygons(mask: np.ndarray, typing: str, parents: bool = True) -> list[dict]:
    """OpenCV contours as the service emits them: string ids, float points; ``typing`` "as_served"
    (every contour with a parent internal) or "depth" (odd depth internal); parents by contour index."""
    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)
    rows, ids, out = hierarchy[0], {}, []
    for i, contour in enumerate(contours):
        depth, parent = 0, rows[i][3]
        while parent != -1:
            depth, parent = depth + 1, rows[parent][3]
        internal = rows[i][3] != -1 if typing == "as_served" else depth % 2 == 1
        ids[i] = f"polygon_{len(out) + 1}"
        poly = {"id": ids[i], "points": [{"x": float(x), "y": float(y)} for x, y in contour.reshape(-1, 2)],
                "type": "internal" if internal else "external"}
        if parents and rows[i][3] != -1:
            poly["parent_id"] = ids[int(rows[i][3])]
        out.append(poly)
    return out


def mask_from_service(polygons: list[dict], shape: tuple[int, int]) -> np.ndarray:
    entry = RECORDED["R08 segment png default model"]
    body = {**entry["body"], "polygons": polygons, "image_size": {"width": shape[1], "height": shape[0]}}
    return replay(entry, body).segment(np.zeros((8, 8), np.uint8), filename="spheroids_8bit.png").to_mask()


@pytest.mark.parametrize("typing", ["as_served", "depth"])
@pytest.mark.parametrize("parents", [True, False])
def test_to_mask_keeps_islands_inside_holes_pixel_exact(typing, parents):
    truth = rings()
    polygons = served_polygons(truth, typing, parents)
    assert sum(p["type"] == "internal" for p in polygons) == (6 if typing == "as_served" else 3)
    drawn = mask_from_service(polygons, truth.shape)
    assert drawn.dtype == bool and np.array_equal(drawn, truth)


def test_to_mask_ring_with_an_island():
    truth = np.zeros((140, 140), np.uint8)
    cv2.circle(truth, (70, 70), 60, 1, -1)
    cv2.circle(truth, (70, 70), 40, 0, -1)
    cv2.circle(truth, (70, 70), 25, 1, -1)
    truth = truth.astype(bool)
    polygons = served_polygons(truth, "as_served")
    assert [(p["type"], p.get("parent_id")) for p in polygons] == [
        ("external", None), ("internal", "polygon_1"), ("internal", "polygon_2")]
    assert np.array_equal(mask_from_service(polygons, truth.shape), truth)


def test_a_timed_out_batch_item_is_a_504_inference_timeout(files):
    """The historic route's timeout item (no status; ``error_detail`` a dict) reads as what /segment answers."""
    ok, failed = BATCH["body"]["results"]
    timeout = {**failed, "error": "Timeout after 60s for model 'resunet_small'",
               "error_detail": {"type": "timeout", "message": "x", "model": "resunet_small", "timeout": 60}}
    item = batch_with(files, [ok, timeout]).errors["error_page.png"]
    assert (item.status, item.code) == (504, "inference_timeout")
    assert str(item).startswith("504: inference timed out (\"Timeout after 60s for model 'resunet_small'\")")


def test_ready_raises_where_the_service_has_no_readyz():
    with pytest.raises(ServiceError, match=r"405: this service has no route GET /readyz.*use GET /health") as err:
        replay(RECORDED["R29 GET /readyz"]).ready()
    assert err.value.code == "method_not_allowed" and err.value.sent["path"] == "/readyz"
