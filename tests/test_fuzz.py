"""Fuzz: over 1,000 generated malformed payloads for ``/predict``, ``/setup`` and ``/webhook``.

Payloads are raw bytes, arbitrary JSON, and valid Label Studio payloads with keys deleted or values
replaced (wrong types, NaN, huge numbers, nesting).  Every answer must be below 500, a JSON body with
a clear ``detail`` message for errors, and the server must stay healthy afterwards.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backend.app import create_app
from backend.serving import ModelHolder
from tests.redis_helpers import CLOSED_REDIS_URL
from tests.test_backend_app import (
    ATTR_XML,
    IMAGE_URL,
    REL_XML,
    SCENE,
    SETUP_PAYLOAD,
    ls_task,
    make_settings,
    predict_payload,
    rect,
)
from tools.ls.payloads import LABEL_CONFIG as WEBHOOK_CONFIG
from tools.ls.payloads import annotation_payload, region_items, timestamp

EXAMPLES = {"mutated": 300, "json": 60, "raw": 40}  # per endpoint: 3 x 400 = 1,200 payloads
FUZZ = settings(
    max_examples=EXAMPLES["mutated"],
    deadline=None,
    database=None,
    derandomize=True,  # the same 1,200 payloads on every run: a failure is reproducible
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

OBJ = SCENE.objects
PREDICT_BATCH = predict_payload(
    [ls_task(1, [rect("a", OBJ[0].box), rect("b", OBJ[1].box)]), ls_task(2, [rect("c", OBJ[2].box)])],
    REL_XML,
)
PREDICT_INTERACTIVE = predict_payload(
    [ls_task(3)], ATTR_XML, context={"result": [rect("a", OBJ[0].box), rect("new", OBJ[1].box)]}
)
WEBHOOK = annotation_payload(
    7, region_items("r1", OBJ[0].box, SCENE.width, SCENE.height, "a small red circle", ["red"]),
    timestamp(1), project_id=1, task_id=3, image=IMAGE_URL,
)  # fmt: skip
WEBHOOK["project"]["label_config"] = WEBHOOK_CONFIG
BASES = {
    "/predict": [PREDICT_BATCH, PREDICT_INTERACTIVE],
    "/setup": [SETUP_PAYLOAD],
    "/webhook": [WEBHOOK, {"action": "START_TRAINING", "project": {"id": 1}},
                 {"action": "ANNOTATIONS_DELETED", "project": {"id": 1}, "annotations": [{"id": 7}]}],
}  # fmt: skip

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["", "<View/>", "NaN", "1e309", "<region99>", "file:///etc/passwd",
                       "http://169.254.169.254/latest", "data:image/png;base64,AAAA", "../../etc/passwd"])
)  # fmt: skip
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=25,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (tuple of keys / indices) into a JSON value, the root excluded."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out += paths(child, (*prefix, key))
    return out


@st.composite
def mutated(draw, bases: list[dict]) -> dict:
    """A valid payload with 1-3 values deleted or replaced."""
    payload = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 3))):
        where = paths(payload)
        if not where:
            break
        path = draw(st.sampled_from(where))
        parent = payload
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return payload


@pytest.fixture(scope="module")
def client(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("fuzz")
    cfg = replace(
        make_settings(tmp, tiny_checkpoint),
        data_dir=tmp / "data",
        redis_url=CLOSED_REDIS_URL,
        max_body_mb=1.0,
    )
    holder = ModelHolder(cfg)
    app = create_app(cfg, holder)
    test_client = app.test_client()
    assert test_client.get("/health").status_code == 200
    holder.get()  # the model is loaded before fuzzing starts
    return test_client


COUNTS: dict[str, int] = {}


def check(client, path: str, body: bytes, content_type: str = "application/json") -> None:
    resp = client.post(path, data=body, content_type=content_type)
    COUNTS[path] = COUNTS.get(path, 0) + 1
    assert resp.status_code < 500, (path, resp.status_code, resp.data[:300], body[:300])
    answer = resp.get_json(silent=True)
    assert isinstance(answer, dict), (path, resp.status_code, resp.data[:200])
    if resp.status_code >= 400:
        detail = answer.get("detail")
        assert isinstance(detail, str) and len(detail) > 5, answer
        assert "Traceback" not in detail


def encode(payload: Any) -> bytes:
    return json.dumps(payload).encode()  # NaN/Infinity as Python writes them: servers see those too


@pytest.mark.slow
@pytest.mark.parametrize("path", list(BASES))
def test_mutated_payloads_never_500(client, path: str):
    @FUZZ
    @given(mutated(BASES[path]))
    def run(payload: dict) -> None:
        check(client, path, encode(payload))

    run()


@pytest.mark.slow
@pytest.mark.parametrize("path", list(BASES))
def test_arbitrary_json_and_bytes_never_500(client, path: str):
    @settings(FUZZ, max_examples=EXAMPLES["json"])
    @given(json_values)
    def run_json(payload: Any) -> None:
        check(client, path, encode(payload))

    @settings(FUZZ, max_examples=EXAMPLES["raw"])
    @given(st.binary(max_size=300), st.sampled_from(["application/json", "text/plain", "image/png"]))
    def run_raw(body: bytes, content_type: str) -> None:
        check(client, path, body, content_type)

    run_json()
    run_raw()


@pytest.mark.slow
def test_server_is_healthy_after_fuzzing(client):
    total = sum(COUNTS.values())
    print(f"\nfuzzed payloads per endpoint: {COUNTS} (total {total})")
    assert total >= 1000
    assert client.get("/health").get_json()["status"] == "UP"
    resp = client.post("/predict", data=encode(PREDICT_BATCH), content_type="application/json")
    assert resp.status_code == 200 and len(resp.get_json()["results"]) == 2
