"""The app and the HTTP API (deris_rerank/app) with the embedded default on the bundled example.

The API must answer exactly what the Python API answers for the same image and expressions,
in both request forms, under concurrent load on a live server, and refuse bad requests with a
4xx and a one-line {"error": ...} while it keeps serving. With batching across requests
(--batch-pairs) the answers equal the Python API's to float32 rounding, each request keeps its
own gate settings, and the queue limits hold. The page's Run callback is tested without a browser.
"""
import base64
import importlib.util
import json
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

try:
    import gradio  # noqa: F401
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
    from fastapi.testclient import TestClient
except ImportError as exc:  # the [app] extra is not installed
    pytest.skip(f"the app's tests need the [app] extra (gradio, fastapi, uvicorn, httpx): {exc}", allow_module_level=True)

from app_helpers import EXAMPLE, REPO, assert_same_answer, live_server
from deris_rerank.app.server import OneLineErrors, create_server
from deris_rerank.app.service import Batching, BusyError, Limits, SegmentService
from deris_rerank.app.ui import EMBEDDED_DEFAULT_NOTE, AppCallbacks, describe_decision
from deris_rerank.errors import InputError
from deris_rerank.pipeline import DEFAULT_MODEL, Pipeline
from deris_rerank.rle import decode_mask

TEXTS = ["the biggest cross", "the blue circle", "the green square"]  # the gate keeps, switches (p_fail 0.90), keeps
MAX_UPLOAD = 64 * 1024  # the example is a few kB
MAX_TEXTS = 4

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").is_file(),
                                reason=f"embedded default model not found in {DEFAULT_MODEL}")


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(device="cpu")


@pytest.fixture(scope="module")
def service(pipe):
    return SegmentService(pipe, Limits(max_upload_bytes=MAX_UPLOAD, max_texts=MAX_TEXTS, queue_timeout_s=120), cache_size=2)


@pytest.fixture(scope="module")
def client(service, tmp_path_factory):
    server = create_server(service, callbacks=AppCallbacks(service, tmp_path_factory.mktemp("app-out")))
    with TestClient(server) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def expected(pipe):
    """The Python API's answers: all TEXTS in one call, and each text alone (JSON)."""
    encoded = pipe.encode(EXAMPLE)
    together = [r.to_json() for r in pipe(encoded, TEXTS)]
    alone = {text: pipe(encoded, [text])[0].to_json() for text in TEXTS}
    return {"together": together, "alone": alone}


def multipart(texts, image=None, name="shapes.png", **fields):
    data = {"text": list(texts), **{k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}}
    return {"files": {"image": (name, EXAMPLE.read_bytes() if image is None else image, "image/png")}, "data": data}


def as_json(texts, image=None, **fields):
    raw = EXAMPLE.read_bytes() if image is None else image
    return {"image": base64.b64encode(raw).decode(), "texts": list(texts), **fields}


def test_multipart_answers_equal_the_python_api(client, expected):
    response = client.post("/api/segment", **multipart(TEXTS))
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["text"] for r in results] == TEXTS
    for got, want in zip(results, expected["together"]):
        assert_same_answer(got, want)
    assert decode_mask(results[0]["mask"]).shape == (192, 192)


def test_json_answers_equal_the_python_api_and_gate_settings_apply_per_request(client, expected, service):
    encoded_before = service.stats()["encoded"]
    response = client.post("/api/segment", json=as_json(TEXTS))
    assert response.status_code == 200, response.text
    for got, want in zip(response.json()["results"], expected["together"]):
        assert_same_answer(got, want)

    off = client.post("/api/segment", json=as_json(TEXTS, gate=False)).json()["results"]
    for got, want in zip(off, expected["together"]):
        assert got["p_fail"] is None and got["selected"] == 0 and not got["switched"]
        assert got["rerank_scores"] is None
        assert got["scores"] == pytest.approx(want["scores"], rel=1e-5)
    assert [r["switched"] for r in expected["together"]] == [False, True, False]
    never = client.post("/api/segment", **multipart(TEXTS, tau=1.0)).json()["results"]
    assert not any(r["switched"] for r in never)
    assert never[1]["mask"] == off[1]["mask"] != expected["together"][1]["mask"]
    eager = client.post("/api/segment", json=as_json(TEXTS[:1], tau=0.0)).json()["results"]
    assert eager[0]["switched"]
    assert [r["p_fail"] for r in never] == pytest.approx([r["p_fail"] for r in expected["together"]], rel=1e-5)

    # the pipeline's own settings are back: the same answers as before
    again = client.post("/api/segment", json=as_json(TEXTS)).json()["results"]
    for got, want in zip(again, expected["together"]):
        assert_same_answer(got, want)
    assert service.stats()["encoded"] == encoded_before  # the image was encoded once, by the first test


def _png_header_claiming(width: int, height: int) -> bytes:
    """A PNG file whose header claims width x height pixels (and no pixel data)."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def bad_requests():
    png = EXAMPLE.read_bytes()
    return {
        "corrupt image": (400, multipart(["the biggest cross"], image=b"not an image at all")),
        "truncated PNG": (400, multipart(["the biggest cross"], image=png[: len(png) // 2])),
        "too many pixels": (400, multipart(["the biggest cross"], image=_png_header_claiming(50_000, 50_000))),
        "empty text": (400, multipart(["the biggest cross", "   "])),
        "no text": (400, {"json": as_json([])}),
        "too many texts": (400, {"json": as_json(["the biggest cross"] * (MAX_TEXTS + 1))}),
        "too large upload": (413, multipart(["the biggest cross"], image=png + b"\0" * MAX_UPLOAD)),
        "too large body": (413, {"json": as_json(["x"], image=b"\0" * (2 * MAX_UPLOAD))}),
        "bad base64": (400, {"json": {"image": "***", "texts": ["the biggest cross"]}}),
        "not JSON": (400, {"content": b"{nope", "headers": {"content-type": "application/json"}}),
        "unknown field": (400, {"json": {**as_json(["x"]), "text": "x"}}),
        "tau out of range": (400, {"json": as_json(["the biggest cross"], tau=1.5)}),
        "gate not a boolean": (400, {"json": as_json(["the biggest cross"], gate="yes")}),
        "no image field": (400, {"data": {"text": "the biggest cross"}, "files": {"other": ("a.txt", b"x")}}),
        "plain text body": (415, {"content": b"hello", "headers": {"content-type": "text/plain"}}),
        "no content type": (415, {"content": b"hello"}),
        "JSON nested 100,000 deep": (400, {"content": b"[" * 100_000 + b"]" * 100_000,
                                           "headers": {"content-type": "application/json"}}),
        "gate nested deeply": (400, {"content": json.dumps(as_json(["x"])).encode()[:-1] + b', "gate": '
                                     + b"[" * 900 + b"]" * 900 + b"}", "headers": {"content-type": "application/json"}}),
        "tau a 400-digit number": (400, {"content": json.dumps(as_json(["x"])).encode()[:-1] + b', "tau": 1'
                                         + b"0" * 400 + b"}", "headers": {"content-type": "application/json"}}),
        "gate form field not a boolean": (400, multipart(["the biggest cross"], gate="yes")),
        "expression above the character limit": (413, multipart(["x" * 1001])),
        "expression with a lone surrogate": (400, {"content": json.dumps(as_json(["the \udcff cross"])).encode(),
                                                   "headers": {"content-type": "application/json"}}),
    }


def test_bad_requests_get_a_4xx_and_one_line_error_and_the_server_keeps_serving(client, expected, service):
    served = service.stats()["served"]
    for name, (status, request) in bad_requests().items():
        response = client.post("/api/segment", **request)
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert list(body) == ["error"], name
        assert body["error"] and "\n" not in body["error"] and "Traceback" not in body["error"], name
    assert service.stats()["served"] == served  # none of them reached the model
    assert "decompression" not in client.post("/api/segment", **bad_requests()["too many pixels"][1]).json()["error"]
    response = client.post("/api/segment", **multipart(TEXTS))
    assert response.status_code == 200
    for got, want in zip(response.json()["results"], expected["together"]):
        assert_same_answer(got, want)
    assert client.get("/api/health").json()["status"] == "ok"


def test_bad_requests_log_one_line_each_without_a_traceback(client, caplog):
    with caplog.at_level(logging.INFO, logger="deris_rerank.app"):
        for name, (status, request) in bad_requests().items():
            caplog.clear()
            client.post("/api/segment", **request)
            lines = [record.getMessage() for record in caplog.records]
            assert len(lines) == 1 and lines[0].startswith(f"refused POST /api/segment ({status}): "), (name, lines)
            assert "\n" not in lines[0] and len(lines[0]) < 400 and not caplog.records[0].exc_info, name


@pytest.mark.parametrize("method, path, status, allow", [
    ("GET", "/api/segment", 405, "POST"),
    ("PUT", "/api/segment", 405, "POST"),
    ("QUERY", "/api/segment", 405, "POST"),  # a method no framework lists
    ("POST", "/api/health", 405, "GET"),
    ("DELETE", "/openapi.json", 405, "GET"),
    ("GET", "/api/segments", 404, None),
    ("POST", "/api", 404, None),
])
def test_other_methods_and_paths_of_the_api_get_405_or_404_in_the_error_shape(client, method, path, status, allow):
    response = client.request(method, path)
    assert response.status_code == status
    assert list(response.json()) == ["error"] and "\n" not in response.json()["error"]
    assert response.headers.get("allow") == allow


def test_openapi_json_describes_this_api_and_not_the_pages_routes(client, service, expected):
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.") and spec["info"]["title"] == "deris-rerank API"
    assert set(spec["paths"]) == {"/api/segment", "/api/health", "/openapi.json"}
    segment = spec["paths"]["/api/segment"]["post"]
    assert set(segment["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert set(segment["responses"]) == {"200", "400", "413", "415", "429", "500"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["Result"]["properties"]) == set(expected["together"][0])  # every field of Result.to_json()
    assert schemas["Error"]["required"] == ["error"]
    errors = spec["components"]["responses"]
    assert set(errors) == {f"Error{status}" for status in (400, 404, 405, 413, 415, 429, 500)}
    assert "an expression above the character limit" in errors["Error413"]["description"]
    texts = schemas["SegmentJSON"]["properties"]["texts"]
    assert texts["maxItems"] == MAX_TEXTS and texts["items"]["maxLength"] == service.limits.max_text_chars

    assert set(client.get("/api/health").json()) == set(schemas["Health"]["properties"])

    example = segment["requestBody"]["content"]["application/json"]["example"]
    response = client.post("/api/segment", json=example)
    assert response.status_code == 200 and [r["text"] for r in response.json()["results"]] == example["texts"]


def test_a_bug_answers_500_in_the_error_shape_and_logs_its_traceback(pipe, caplog, monkeypatch):
    service = SegmentService(pipe)

    def broken(*args):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setattr(service, "segment", broken)
    with caplog.at_level(logging.INFO, logger="deris_rerank.app"):
        response = TestClient(create_server(service, ui=False)).post("/api/segment", **multipart(["the biggest cross"]))
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError: a bug over two lines); please report it"}
    (record,) = caplog.records
    assert record.exc_info and record.getMessage() == "bug answering POST /api/segment"


def test_the_pages_routes_answer_a_malformed_request_without_raising(client, caplog):
    with caplog.at_level(logging.INFO, logger="deris_rerank.app"):
        response = client.get("/?page=%C2%A8%F3%B7%A8%96")  # Gradio raises KeyError on an unknown page
    assert response.status_code in (404, 500)
    assert all(not record.exc_info and "\n" not in record.getMessage() for record in caplog.records)


def test_an_exception_in_a_wrapped_app_answers_500_and_logs_one_line(caplog):
    async def broken(scope, receive, send):
        raise KeyError("some page")

    with caplog.at_level(logging.INFO, logger="deris_rerank.app"):
        response = TestClient(OneLineErrors(broken)).get("/somewhere?page=x")
    assert response.status_code == 500
    (record,) = caplog.records
    assert not record.exc_info
    assert re.fullmatch(r"failed GET /somewhere \(500\): KeyError: 'some page' \(raised at tests/test_app\.py:\d+\)",
                        record.getMessage())


def test_a_request_that_cannot_get_the_model_in_time_gets_429(pipe, expected):
    service = SegmentService(pipe, Limits(queue_timeout_s=0.01))
    api = TestClient(create_server(service, ui=False))
    with service._model_lock:  # another request holds the model
        response = api.post("/api/segment", **multipart(["the biggest cross"]))
    assert response.status_code == 429 and "retry later" in response.json()["error"]
    assert service.stats()["refused_busy"] == 1
    response = api.post("/api/segment", **multipart(["the biggest cross"]))
    assert response.status_code == 200
    assert_same_answer(response.json()["results"][0], expected["alone"]["the biggest cross"])


def test_a_running_calls_gate_settings_do_not_leak_into_other_requests(service):
    own_tau = service.default_tau
    with service._decision_settings(False, None):  # as while a gate-off request's model call runs
        assert service.has_gate and service.default_tau == own_tau
        assert service.check_request(EXAMPLE.read_bytes(), TEXTS, tau=0.5) == TEXTS
    with service._decision_settings(True, 0.1):
        assert service.default_tau == own_tau


@pytest.fixture(scope="module")
def server_url(service, tmp_path_factory):
    """The whole server (API + page) under uvicorn on 127.0.0.1; yields its base URL."""
    with live_server(create_server(service, callbacks=AppCallbacks(service, tmp_path_factory.mktemp("live-out")))) as url:
        yield url


def post_from_clients(url: str, clients: int = 16, per_client: int = 4):
    """The issue's bounded load: `clients` sessions at once, each sending `per_client` requests of one
    expression (multipart and JSON in turn); returns (text, status, body) of every request."""
    import requests

    def one_client(number):
        answers = []
        with requests.Session() as session:
            for k in range(per_client):
                text = TEXTS[(number + k) % len(TEXTS)]
                if (number + k) % 2:
                    response = session.post(f"{url}/api/segment", json=as_json([text]), timeout=300)
                else:
                    request = multipart([text])
                    response = session.post(f"{url}/api/segment", files=request["files"], data=request["data"], timeout=300)
                answers.append((text, response.status_code, response.json()))
        return answers

    with ThreadPoolExecutor(clients) as pool:
        return [a for batch in pool.map(one_client, range(clients)) for a in batch]


def test_concurrent_clients_all_get_the_python_api_answer(server_url, expected, service):
    import requests

    served = service.stats()["served"]
    answers = post_from_clients(server_url)
    assert len(answers) == 64
    for text, status, body in answers:
        assert status == 200, body
        assert_same_answer(body["results"][0], expected["alone"][text])
    health = requests.get(f"{server_url}/api/health", timeout=60).json()
    assert health["status"] == "ok" and health["served"] == served + len(answers)
    assert health["refused_busy"] == 0 and health["waiting"] == 0
    assert health["batching"]["max_pairs"] == 1 and health["largest_batch_requests"] == 1
    page = requests.get(f"{server_url}/", timeout=60)
    assert page.status_code == 200 and "gradio" in page.text.lower()


SCHEMATHESIS = importlib.util.find_spec("schemathesis") is not None


@pytest.mark.skipif(not SCHEMATHESIS, reason="needs schemathesis (in the [test] extra: pip install -e \".[test]\")")
@pytest.mark.filterwarnings("ignore::deris_rerank.errors.UnknownWordsWarning")
def test_schemathesis_finds_no_server_error_and_no_departure_from_the_spec(server_url, service, tmp_path):
    """schemathesis (tested with 4.32.5) against the served /openapi.json of the live server on
    127.0.0.1: its examples, coverage and fuzzing phases, 30 examples per operation, a fixed seed,
    one worker. Left out: positive_data_acceptance (random bytes that the spec calls a valid image
    file are not an image: 400) and negative_data_rejection (a form field is a string on the wire,
    so a "wrong-typed" text the fuzzer sends as "{}" is a valid expression)."""
    checks = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
              "response_schema_conformance,missing_required_header,unsupported_method,allow_header_conformance")
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server_url}/openapi.json", "--checks", checks,
               "--max-examples", "30", "--seed", "1", "--workers", "1", "--continue-on-failure",
               "--generation-database", "none", "--request-timeout", "120", "--no-color"]
    served = service.stats()["served"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    assert service.stats()["served"] > served  # it got answers, not only refusals (the spec's example is an image)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_app_commands_log_has_one_line_per_refused_request_and_no_traceback(tmp_path):
    """`deris-rerank app` as a user starts it, on 127.0.0.1: its stderr after refused API requests,
    an answered one with unknown words, and a request that makes the page's routes raise."""
    import requests

    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "deris_rerank", "app", "--port", str(port)],
                                  stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):  # up to 120 s to start: a bound, not a speed test
            try:
                if requests.get(f"{url}/api/health", timeout=5).ok:
                    break
            except requests.ConnectionError:
                assert server.poll() is None, log_path.read_text()
                threading.Event().wait(0.1)
        refused = [
            requests.get(f"{url}/api/segment", timeout=60),
            requests.post(f"{url}/api/segment", data=b"[" * 100_000 + b"]" * 100_000,
                          headers={"content-type": "application/json"}, timeout=60),
            requests.post(f"{url}/api/segment", json={"image": "***", "texts": ["x"]}, timeout=60),
            requests.delete(f"{url}/api/nowhere", timeout=60),
        ]
        answered = requests.post(f"{url}/api/segment", json=as_json(["the zorblaxest cross"]), timeout=300)
        page = requests.get(f"{url}/?page=%C2%A8%F3%B7%A8%96", timeout=60)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(60)
    assert [r.status_code for r in refused] == [405, 400, 400, 404] and answered.status_code == 200
    assert answered.json()["results"][0]["unknown_words"] and page.status_code in (404, 500)
    log = log_path.read_text()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines()
             if not line.startswith(("deris-rerank: warning: using the embedded default", "deris-rerank app: http"))]
    assert len(lines) == 4 + (page.status_code == 500), log
    for line, status, start in zip(lines, (405, 400, 400, 404), ("GET /api/segment", "POST /api/segment",
                                                                   "POST /api/segment", "DELETE /api/nowhere")):
        assert re.search(rf" INFO refused {start} \({status}\): \S", line), line
    assert all(re.search(r" ERROR failed GET / \(500\): ", line) for line in lines[4:]), lines


def test_batched_server_gives_concurrent_clients_the_python_api_answer(pipe, expected):
    import requests

    service = SegmentService(pipe, Limits(queue_timeout_s=120), batching=Batching(max_pairs=8, wait_ms=5))
    with live_server(create_server(service, ui=False)) as url:
        answers = post_from_clients(url)
        health = requests.get(f"{url}/api/health", timeout=60).json()
    assert len(answers) == 64
    for text, status, body in answers:
        assert status == 200, body
        assert_same_answer(body["results"][0], expected["alone"][text], abs_tol=1e-5)
    assert health["batching"] == {"max_pairs": 8, "wait_ms": 5}
    assert health["served"] == health["batched_pairs"] == 64 and health["refused_busy"] == health["waiting"] == 0
    assert 1 < health["largest_batch_pairs"] <= 8 and health["batches"] < 64  # requests shared model calls


def queue_while_model_held(service, calls):
    """Run each `calls` item (keyword arguments of `service.segment`) in its own thread while the model
    is held, release the model once each of them waits in the queue or was refused, and return their
    outcomes in order (a list of Results, or the exception raised)."""
    outcomes = [None] * len(calls)

    def call(k):
        try:
            outcomes[k] = service.segment(EXAMPLE.read_bytes(), **calls[k])
        except Exception as exc:
            outcomes[k] = exc

    service._model_lock.acquire()  # as a model call in progress would
    threads = [threading.Thread(target=call, args=(k,)) for k in range(len(calls))]
    for thread in threads:
        thread.start()
    waited = threading.Event()
    for _ in range(6000):  # a bound on the wait (60 s), not a speed test
        if service.stats()["waiting"] + sum(outcome is not None for outcome in outcomes) == len(calls):
            break
        waited.wait(0.01)
    service._finish([])  # the call in progress ends: the queue runs
    for thread in threads:
        thread.join(120)
    return outcomes


def test_batched_requests_keep_their_own_gate_settings(pipe):
    batched = SegmentService(pipe, Limits(queue_timeout_s=120), batching=Batching(max_pairs=4, wait_ms=0))
    five = TEXTS + TEXTS[:2]  # above max_pairs: runs alone
    calls = [dict(texts=TEXTS), dict(texts=TEXTS[1:2], tau=batched.default_tau),  # gate on, its own tau: one call
             dict(texts=TEXTS, gate=False), dict(texts=TEXTS[:1], gate=False),  # gate off: one call
             dict(texts=TEXTS, tau=1.0), dict(texts=TEXTS[1:2], tau=0.0), dict(texts=five)]  # one call each
    outcomes = queue_while_model_held(batched, calls)
    one_at_a_time = SegmentService(pipe)  # the Python API's answers (the tests above)
    for call, outcome in zip(calls, outcomes):
        assert isinstance(outcome, list), outcome
        want = one_at_a_time.segment(EXAMPLE.read_bytes(), **call)
        assert [r.text for r in outcome] == call["texts"]
        for got, wanted in zip(outcome, want):
            assert_same_answer(got.to_json(), wanted.to_json(), abs_tol=1e-5)
    assert all(r.p_fail is None and not r.switched for r in outcomes[2] + outcomes[3])
    assert not any(r.switched for r in outcomes[4]) and outcomes[5][0].switched and outcomes[0][1].switched
    stats = batched.stats()
    assert stats["batches"] == 5 and stats["largest_batch_requests"] == 2 and stats["largest_batch_pairs"] == 5
    assert stats["batched_pairs"] == 17 and stats["encoded"] == 1 and stats["served"] == 7


def test_batched_queue_limits_hold_and_a_refused_request_never_runs(pipe):
    data = EXAMPLE.read_bytes()
    impatient = SegmentService(pipe, Limits(queue_timeout_s=0.05), batching=Batching(max_pairs=8, wait_ms=5))
    impatient._model_lock.acquire()
    with pytest.raises(BusyError, match="retry later"):
        impatient.segment(data, TEXTS[:1])
    impatient._finish([])
    assert impatient.stats()["refused_busy"] == 1 and impatient.stats()["waiting"] == 0
    assert len(impatient.segment(data, TEXTS[1:])) == 2
    stats = impatient.stats()
    assert stats["batches"] == 1 and stats["batched_pairs"] == 2 and stats["served"] == 1  # the refused one did not run

    crowded = SegmentService(pipe, Limits(max_waiting=1), batching=Batching(max_pairs=8, wait_ms=5))
    outcomes = queue_while_model_held(crowded, [dict(texts=TEXTS[:1]), dict(texts=TEXTS[1:2])])
    refused = [o for o in outcomes if isinstance(o, BusyError)]
    assert len(refused) == 1 and "1 requests waiting" in str(refused[0]) and crowded.stats()["served"] == 1


@pytest.mark.parametrize("settings, message", [
    (dict(max_pairs=0), "max_pairs (--batch-pairs) must be a whole number from 1 to 256, got 0"),
    (dict(max_pairs=257), "from 1 to 256, got 257"),
    (dict(max_pairs=2.5), "whole number"),
    (dict(wait_ms=-1), "wait_ms (--batch-wait-ms) must be from 0 to 1000 milliseconds, got -1"),
    (dict(wait_ms=float("nan")), "got nan"),
])
def test_batching_settings_out_of_range_are_refused_in_one_line(settings, message):
    with pytest.raises(InputError, match=re.escape(message)):
        Batching(**settings)


def test_the_app_command_refuses_bad_batching_before_loading_the_model(capsys):
    from deris_rerank.cli import main

    assert main(["app", "--batch-pairs", "0", "--deris", "no-such-model"]) == 2
    error = capsys.readouterr().err.strip()
    assert "--batch-pairs" in error and "\n" not in error and "no-such-model" not in error


def test_the_run_button_callback_shows_overlays_decisions_and_downloads(service, expected, tmp_path):
    callbacks = AppCallbacks(service, tmp_path)
    status, overlays, heading, tiles, answers, decisions, files = callbacks.run(str(EXAMPLE), "\n".join(TEXTS) + "\n\n", True, None)
    assert status == "3 expressions answered."
    assert [caption for _, caption in overlays] == [f"{k}. {t}" for k, t in enumerate(TEXTS, 1)]
    assert all(image.shape == (192, 192, 3) and image.dtype == np.uint8 for image, _ in overlays + answers)
    assert len(tiles) == 30 and all(tile.shape == (256, 256, 3) for tile, _ in tiles)
    chosen = [k for k, (tile, _) in enumerate(tiles[:10]) if (tile[:4, :, 1] == 220).all()]  # the green frame
    assert chosen == [expected["together"][0]["selected"]]
    # DeRIS's own answer has no legend ("chosen" would be wrong there): its corner is the image's
    from PIL import Image

    corner = np.asarray(Image.open(EXAMPLE).convert("RGB"))[:24, :64]
    assert not decode_mask(expected["together"][0]["deris_mask"])[:24, :64].any()
    assert all(np.array_equal(answer[:24, :64], corner) for answer, _ in answers)
    assert heading.endswith("1. the biggest cross: tiles 1-10; 2. the blue circle: tiles 11-20; "
                            "3. the green square: tiles 21-30.")
    for text, want in zip(TEXTS, expected["together"]):
        assert text in decisions
    assert re.search(r"\*\*Kept\*\* Query-0 .*: p_fail \d\.\d{3} ≤ tau 0\.66", decisions)
    assert re.search(r"\*\*Switched\*\* from Query-0 to candidate #1 .*: p_fail 0\.9\d\d > tau 0\.66", decisions)
    assert len(files) == 6
    saved = [json.loads(Path(f).read_text()) for f in files if f.endswith(".json")]
    for got, want in zip(saved, expected["together"]):
        assert_same_answer(got, want)
    mask_png = np.asarray(Image.open(files[0])) > 0
    assert np.array_equal(mask_png, decode_mask(expected["together"][0]["mask"]))

    *_, off, _ = callbacks.run(str(EXAMPLE), TEXTS[0], False, 0.3)
    assert "gate is off" in off


@pytest.mark.parametrize("image, text, message", [
    (None, "the biggest cross", "no image"),
    (EXAMPLE, " \n ", "no expression"),
    (REPO / "setup.py", "the biggest cross", "cannot decode image file setup.py"),
])
def test_the_run_button_callback_shows_one_readable_error(service, tmp_path, image, text, message):
    status, overlays, heading, tiles, answers, decisions, files = AppCallbacks(service, tmp_path).run(
        None if image is None else str(image), text, True, 0.5)
    assert status.startswith("**Error:**") and message in status and "\n" not in status
    assert overlays == tiles == answers == files == [] and decisions == "" and "tiles" not in heading


def test_the_embedded_default_note_describes_refshapes_as_it_draws_them():
    from deris_rerank.data.refshapes.vocabulary import COLOURS, PLURAL, SHAPES, STYLES

    note = EMBEDDED_DEFAULT_NOTE
    assert all(PLURAL[shape] in note for shape in SHAPES) and all(colour in note for colour in COLOURS)
    assert all(style in note for style in STYLES) and "gradient" in note and "clutter lines" in note
    assert "plain background" not in note


def test_decision_words(expected):
    from deris_rerank.result import Result

    want = expected["alone"]["the biggest cross"]
    result = Result(text="x", mask=np.zeros((2, 2), bool), selected_rank=2, switched=True, p_fail=0.9,
                    scores=[0.9, 0.5, 0.4], slots=[3, 1, 0], deris_mask=np.zeros((2, 2), bool),
                    default_mask=np.zeros((2, 2), bool), existence=1.0, timings={})
    assert describe_decision(result, True, 0.5).startswith("**Switched** from Query-0 to candidate #2")
    kept = Result(**{**result.__dict__, "switched": False, "selected_rank": 0, "selected_ranks": [0]})
    assert "no other candidate was predicted" in describe_decision(kept, True, 0.5)
    assert "trusts DeRIS" in describe_decision(kept, True, 0.95)
    assert want["text"] == "the biggest cross"
    nothing = Result(**{**result.__dict__, "text": "the purple star", "answer": "set", "selected_rank": None,
                        "selected_ranks": [], "p_no_target": 0.97})
    assert describe_decision(nothing, True, 0.5).startswith('**No object matches** "the purple star"')
    several = Result(**{**nothing.__dict__, "selected_rank": 0, "selected_ranks": [0, 2], "switched": False})
    words = describe_decision(several, True, 0.5)
    assert words.startswith("**2 objects** (candidates #0, #2)") and "the same as DeRIS's own" in words


def test_only_the_app_package_imports_gradio_fastapi_or_uvicorn():
    package = REPO / "deris_rerank"
    pattern = re.compile(r"^\s*(import|from)\s+(gradio|fastapi|uvicorn|starlette)\b", re.M)
    outside = [str(p.relative_to(REPO)) for p in package.rglob("*.py")
               if "app" not in p.relative_to(package).parts[:1] and pattern.search(p.read_text())]
    assert outside == []


def test_the_app_command_listens_on_this_machine_only_by_default():
    from deris_rerank.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert args.host == "127.0.0.1" and args.port == 7860 and args.run.__name__ == "cmd_app"
