"""The reference service against the real service's 44 recorded answers (``data/service_api/``).

Every recorded request is sent over HTTP to the reference service in both presets:

- ``as_served``: the recorded status, the same field names (no more, no fewer), value
  types and nesting, the same CORS headers and the same error texts (memory addresses in
  PIL's texts and the pydantic version in a 422 ``url`` aside).
- ``fixed``: every recorded field exists with the same type (extra fields allowed); the
  statuses in :data:`FIXED_DIFFERS` differ on purpose (mirrored in the README).

Polygon counts, coordinates, timings and timestamps are not the contract. The models are
the instant stand-ins of ``mlbench.service.fakes`` under the service's ids.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

import mlbench as mb
from mlbench.pipeline.result import NO_POLYGONS_WARNING
from mlbench.service import ServiceSettings, create_app, serve_in_thread
from mlbench.service.fakes import BrightModel

torch.set_num_threads(1)
RECORDED = json.loads((Path(__file__).parent / "data" / "service_api" / "recorded_seed.json").read_text())["requests"]
HTML = b"<!DOCTYPE html>\n<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>\n"
SEGMENT_200, BATCH_200 = "R08 segment png default model", "R21 batch 1 file resunet_advanced"

FIXED_DIFFERS = {  # request -> (status under fixed, why, recorded answer of the same shape: None for an
    # error answer (detail text + corrections), "" for a route the real service did not have)
    "R11 segment .tif resunet_advanced": (200, "the type is read from the content, not the name", SEGMENT_200),
    "R13 segment .gif": (200, "a GIF is an image: read from the content", SEGMENT_200),
    "R15 segment unknown model unet": (422, "a client mistake (the model field), not a server failure", None),
    "R16 segment truncated png": (422, "a client mistake (a damaged upload), not a server failure", None),
    "R17 segment html as .png": (415, "not an image by its content (an HTML error page)", None),
    "R23 batch png + gif resunet_small": (200, "both files are images by their content", BATCH_200),
    "R24 batch unknown model": (422, "an unknown model refuses the whole batch before any work", None),
    "R25 segment empty file": (422, "a client mistake (an empty upload), not a server failure", None),
    "R29 GET /readyz": (200, "the fixed service's readiness route", ""),
    "X unknown path": (404, "a path that does not exist is 404, not the OPTIONS catch-all's 405", None),
}
FIXED_ONLY_ROUTES = {"/livez": ["get"], "/readyz": ["get"], "/metrics": ["get"]}


def _uploads() -> dict[str, bytes]:
    """The recorded uploads (``_files`` of the recording), built from ``data/samples``."""
    png = mb.load_sample("spheroids_8bit").path.read_bytes()
    tif = mb.load_sample("spheroids_16bit").path.read_bytes()
    gif = io.BytesIO()
    Image.open(io.BytesIO(png)).save(gif, format="GIF")
    return {"spheroids_8bit.png": png, "spheroids_rgb.jpg": mb.load_sample("spheroids_rgb").path.read_bytes(),
            "spheroids_16bit.tif": tif, "spheroids_16bit.tiff": tif, "spheroids.gif": gif.getvalue(),
            "truncated.png": png[: len(png) // 2], "error_page.png": HTML, "empty.png": b""}


def _send(client: httpx.Client, request: dict, uploads: dict[str, bytes]) -> httpx.Response:
    names = [(field, name.split(" (")[0]) for field, name in request.get("files", [])]
    files = [(field, (name, uploads[name])) for field, name in names] or None
    return client.request(request["method"], request["path"], files=files, data=request.get("form"),
                          params=request.get("query"), json=request.get("json"), headers=request.get("headers"))


def _answers(settings: ServiceSettings) -> dict[str, httpx.Response]:
    uploads = _uploads()
    with serve_in_thread(create_app(settings)) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        return {name: _send(client, entry["request"], uploads) for name, entry in RECORDED.items()}


def _settings(preset: str) -> ServiceSettings:
    common = dict(models={sid: BrightModel() for sid in ("hrnet", "resunet_small", "resunet_advanced")},
                  options={"input_size": 64}, warmup=False)
    return ServiceSettings.as_served(**common) if preset == "as_served" else ServiceSettings(**common)


@pytest.fixture(scope="module")
def answers() -> dict[str, dict[str, httpx.Response]]:
    return {preset: _answers(_settings(preset)) for preset in ("as_served", "fixed")}


# ---- comparing shapes ------------------------------------------------------------------------------
def _kind(value, exact: bool) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, (str, list, dict)):
        return type(value).__name__
    return type(value).__name__ if exact else "number"


def _without_cuts(recorded: dict) -> dict:
    """The recording cut long lists to 2 and kept ``<name>_total``: those keys are no field."""
    return {k: v for k, v in recorded.items() if not (k.endswith("_total") and k[: -len("_total")] in recorded)}


def _schema(items: list) -> tuple[dict, set, set]:
    """A list's items merged: an example per key, keys every item has, keys some item has."""
    dicts = [_without_cuts(item) for item in items if isinstance(item, dict)]
    example = {k: v for item in dicts for k, v in item.items()}
    return example, set.intersection(*(set(d) for d in dicts)), set(example)


def _recorded_polygons(value) -> list:
    """Every polygon of every recorded answer (each answer shows only its first two)."""
    if isinstance(value, dict):
        own = value.get("polygons") if isinstance(value.get("polygons"), list) else []
        return own + [p for k, v in value.items() if k != "polygons" for p in _recorded_polygons(v)]
    return [p for v in value for p in _recorded_polygons(v)] if isinstance(value, list) else []


POLYGON_SCHEMA = _schema(_recorded_polygons([entry["body"] for entry in RECORDED.values()]))


def assert_same_shape(actual, recorded, exact: bool, where: str = "body") -> None:
    """Same kinds and nesting; with ``exact`` the same keys, else the recorded keys and maybe more."""
    assert _kind(actual, exact) == _kind(recorded, exact), f"{where}: {actual!r} vs recorded {recorded!r}"
    if isinstance(recorded, dict):
        recorded = _without_cuts(recorded)
        extra = {"warning"} if actual.get("polygons") == [] and "polygons" in recorded else set()
        missing, added = set(recorded) - set(actual), set(actual) - set(recorded) - extra
        assert not missing and not (exact and added), f"{where}: missing {missing}, extra {added}"
        if "warning" in extra & set(actual):
            assert actual["warning"] == NO_POLYGONS_WARNING
        for key in recorded:
            assert_same_shape(actual[key], recorded[key], exact, f"{where}.{key}")
    elif isinstance(recorded, list) and recorded and actual:
        if where.endswith(".results") or not isinstance(recorded[0], dict):
            pairs = zip(actual, recorded) if len(actual) == len(recorded) else ((a, recorded[0]) for a in actual)
            for i, (item, reference) in enumerate(pairs):
                assert_same_shape(item, reference, exact, f"{where}[{i}]")
            return
        example, required, allowed = POLYGON_SCHEMA if where.endswith(".polygons") else _schema(recorded)
        for i, item in enumerate(actual):
            keys = set(item)
            assert required <= keys and (not exact or keys <= allowed), f"{where}[{i}]: keys {sorted(keys)}"
            for key in required | (keys & allowed):
                assert_same_shape(item[key], example[key], exact, f"{where}[{i}].{key}")


def _masked(value):
    """Texts with memory addresses and the pydantic docs version masked, and 422 urls dropped."""
    if isinstance(value, str):
        return re.sub(r"0x[0-9a-f]+", "0x?", value)
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, dict):
        return {k: _masked(v) for k, v in value.items() if k != "url"}
    return value


def _body(response: httpx.Response):
    return response.json() if response.headers.get("content-type", "").startswith("application/json") else response.text


def _cors(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


NAMES = sorted(RECORDED)


# ---- as_served -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_as_served_answers_as_recorded(answers, name):
    recorded, response = RECORDED[name], answers["as_served"][name]
    body = _body(response)
    assert response.status_code == recorded["status"], body
    assert "retry-after" not in response.headers
    if "cors_headers" in recorded:
        assert _cors(response) == recorded["cors_headers"]
    if name == "R28 GET /openapi.json":
        assert {path: sorted(ops) for path, ops in body["paths"].items()} == recorded["body"]
        return
    assert_same_shape(body, recorded["body"], exact=True)
    if recorded["status"] >= 400 or isinstance(body, str) or not body:
        assert _masked(body) == _masked(recorded["body"])  # every error text, "OK", {}


def test_as_served_fixed_texts_and_numbers(answers):
    served = {name: _body(r) for name, r in answers["as_served"].items()}
    recorded_models = RECORDED["R04 GET /api/v1/models"]["body"]["models"]
    assert served["R04 GET /api/v1/models"]["models"].keys() == recorded_models.keys()
    for model_id, info in recorded_models.items():
        mine = served["R04 GET /api/v1/models"]["models"][model_id]
        keys = ("name", "description", "recommended_threshold", "optimal_batch_size", "max_safe_batch_size",
                "expected_throughput")
        assert {k: mine[k] for k in keys} == {k: info[k] for k in keys}
    assert served["R02 GET /health"]["models_loaded"] == 3
    assert served["R19 segment model/threshold in query string"]["model_used"] == "hrnet"
    assert served["R19 segment model/threshold in query string"]["threshold_used"] == 0.5
    for name, index in (("R24 batch unknown model", 0), ("R22 batch png + html-as-png resunet_small", 1)):
        failed, recorded_item = served[name]["results"][index], RECORDED[name]["body"]["results"][index]
        assert _masked(failed) == _masked(recorded_item)  # the bare exception text, no "Segmentation failed: "
    for name in ("X gpu status", "X gpu summary", "X gpu batch-metrics", "X gpu memory-pressure", "X gpu clear-cache",
                 "X metrics-info", "R01 GET /"):
        assert served[name] == RECORDED[name]["body"], name


@pytest.mark.parametrize("preset", ["as_served", "fixed"])
def test_metrics_endpoints_compute_the_recorded_numbers(answers, preset):
    for name, entry in RECORDED.items():
        if "calculate-metrics" not in entry["request"]["path"] or entry["status"] != 200:
            continue
        mine, theirs = _body(answers[preset][name]), entry["body"]
        pairs = zip(mine, theirs) if isinstance(theirs, list) else [(mine, theirs)]
        for got, want in pairs:
            assert list(got) == list(want)
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (name, key)


# ---- fixed -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_fixed_keeps_every_recorded_field(answers, name):
    recorded, response = RECORDED[name], answers["fixed"][name]
    body = _body(response)
    status, _, reference = FIXED_DIFFERS.get(name, (recorded["status"], "", name))
    assert response.status_code == status, body
    if "cors_headers" in recorded:
        assert _cors(response) == recorded["cors_headers"]
    if name == "R28 GET /openapi.json":
        paths = {path: sorted(ops) for path, ops in body["paths"].items()}
        assert paths == {**recorded["body"], **FIXED_ONLY_ROUTES}
    elif reference:
        assert_same_shape(body, RECORDED[reference]["body"], exact=False)
    elif reference is None:  # an error answer either way: the recorded fields, plus the corrections
        assert isinstance(body["detail"], str) and body["error"] and body["message"] and body["request_id"]


def test_fixed_keeps_the_texts_a_client_matches(answers):
    fixed = {name: _body(r) for name, r in answers["fixed"].items()}
    for name in ("R06 GET /api/v1/segment/task-1", "R20 batch 2 files resunet_advanced"):
        assert fixed[name]["detail"] == RECORDED[name]["body"]["detail"]
    for name in ("R14 segment threshold=5", "R18 segment no file", "X calculate-metrics bad body"):
        assert _masked(fixed[name]["detail"]) == _masked(RECORDED[name]["body"]["detail"])
    assert fixed["R20 batch 2 files resunet_advanced"]["limit"] == 1
    assert "query parameter(s) model, threshold ignored" in fixed["R19 segment model/threshold in query string"][
        "warnings"][0]
    assert fixed["R02 GET /health"]["models"] == ["hrnet", "resunet_advanced", "resunet_small"]


def test_zero_polygons_carry_the_warning_in_both_presets():
    flat = io.BytesIO()
    Image.new("L", (48, 48), 120).save(flat, format="PNG")
    for preset in ("as_served", "fixed"):
        with serve_in_thread(create_app(_settings(preset))) as server:
            body = httpx.post(server.url + "/api/v1/segment", files={"file": ("flat.png", flat.getvalue())},
                              timeout=30).json()
        assert body["polygons"] == [] and body["warning"] == NO_POLYGONS_WARNING
        assert body["processing_info"] == {"device": "cpu", "num_polygons": 0, "confidence_scores": [], "batch_size": 1}


def test_the_readme_lists_every_status_that_differs_on_purpose():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for name, (status, why, _) in FIXED_DIFFERS.items():
        line = f"| {name.split(' ', 1)[1]} | {RECORDED[name]['status']} | {status} | {why} |"
        assert line in readme, line
