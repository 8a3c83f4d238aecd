"""``understudy serve`` on 127.0.0.1 with a real tiny GGUF student routed by ``ChatUnderstudy``,
a teacher and a trace recorder, fed generated traffic over real sockets: raw HTTP of any shape
(request lines, header blocks, bodies shorter or longer than their ``Content-Length``, chunked
bodies, connections closed mid-request) and generated chat requests, streamed or not. Every
response is a 2xx or an OpenAI-style 4xx (never a 5xx), or, for bytes that are not HTTP, a 4xx
from the HTTP layer or a closed connection; the server keeps answering, and the traces stored
before are all still there when the store is reopened.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _understudy_fakes import FakeTeacher
from hypothesis import example, given
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage
from prometheus_client.parser import text_string_to_metric_families

from langchain_understudy.config import ServerSettings
from langchain_understudy.distill_jobs.recorder import TraceRecorder
from langchain_understudy.distill_jobs.traces import TraceStore
from langchain_understudy.plugin.server import ServerThread, create_app
from langchain_understudy.router import ChatUnderstudy, Router
from langchain_understudy.students import ChatStudent

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit_tests"))
from test_fuzz_http import request_objects  # noqa: E402
from test_fuzz_strategies import any_text, encode, fuzz_settings  # noqa: E402

pytestmark = pytest.mark.slow
FUZZ = fuzz_settings(ci_examples=25)
LIMIT = 8192
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def served(tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    store = tmp_path_factory.mktemp("serve") / "traces.sqlite"
    with TraceStore(store) as s:
        for i in range(3):
            s.add([HumanMessage(f"seed {i}")], AIMessage(f"answer {i}"), tags=["seed"])
        seeded = {t.id: t.content_hash for t in s.iter_traces(tags=["seed"])}
    recorder = TraceRecorder(store, redact=False)
    llm = ChatUnderstudy(
        student=ChatStudent(model_path=tiny_gguf, n_ctx=256, max_tokens=4, n_parallel=2),
        teacher=FakeTeacher(),
        router=Router(threshold=0.5),
        trace_callbacks=[recorder],
    )
    settings = ServerSettings(max_request_bytes=LIMIT, max_tokens_limit=16)
    with ServerThread(create_app(llm, settings=settings, api_key="")) as server:
        yield {"server": server, "recorder": recorder}
    recorder.close()
    with TraceStore(store) as s:  # reopened: everything stored before is still there
        for trace_id, digest in seeded.items():
            got = s.get(trace_id)
            assert got is not None and got.content_hash == digest


def _root(server: ServerThread) -> str:
    return server.base_url.removesuffix("/v1")


def _still_serving(server: ServerThread) -> None:
    resp = httpx.get(f"{_root(server)}/healthz", timeout=TIMEOUT_S)
    assert resp.status_code == 200 and resp.json()["status"] == "ok"


# -- strategies -------------------------------------------------------------------------------

token = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
header_line = st.one_of(
    st.builds(lambda k, v: f"{k}: {v}".encode(), token, token),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r\n", b"")),
    st.sampled_from(
        [
            b"Transfer-Encoding: chunked",
            b"Content-Length: -1",
            b"Content-Length: 1e3",
            b"Content-Length: 99999999999999999999",
            b"Expect: 100-continue",
            b"Content-Type: text/plain",
            b"Host:",
            b": no-name",
            b"Connection: close",
        ]
    ),  # fmt: skip
)


@st.composite
def raw_requests(draw: st.DrawFn) -> bytes:
    """Bytes of an HTTP/1.1 request, well-formed or not, possibly cut short."""
    method = draw(st.sampled_from([b"POST", b"GET", b"PUT", b"OPTIONS", b"HEAD", b"P0ST", b""]))
    target = draw(
        st.sampled_from(
            [
                b"/v1/chat/completions",
                b"/v1/models",
                b"/healthz",
                b"/metrics",
                b"/v1/../etc/passwd",
                b"*",
                b"/%ff%fe",
            ]
        )  # fmt: skip
        | token.map(str.encode)
    )
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"HTTP/1.1 x", b""]))
    body = draw(request_objects().map(encode) | st.binary(max_size=300))
    declared = draw(st.sampled_from(["exact", "short", "long", "none", "chunked"]))
    lines = [method + b" " + target + b" " + version, b"Host: 127.0.0.1",
             b"Content-Type: application/json"]  # fmt: skip
    if declared == "exact":
        lines.append(b"Content-Length: %d" % len(body))
    elif declared == "short":
        lines.append(b"Content-Length: %d" % max(0, len(body) - draw(st.integers(1, 50))))
    elif declared == "long":
        lines.append(b"Content-Length: %d" % (len(body) + draw(st.integers(1, 50))))
    elif declared == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        body = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    lines += draw(st.lists(header_line, max_size=4))
    data = b"\r\n".join(lines) + b"\r\n\r\n" + body
    if draw(st.integers(0, 4)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data


def _exchange(server: ServerThread, data: bytes) -> bytes:
    """Send ``data``, close the sending half, and read until the server closes or times out."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT_S) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _statuses(reply: bytes) -> list[int]:
    """Status codes of the responses in ``reply`` (more than one when a request was pipelined)."""
    out = []
    for line in reply.split(b"\r\n"):
        if line.startswith(b"HTTP/1.") and len(line) >= 12 and line[9:12].isdigit():
            out.append(int(line[9:12]))
    return out


# -- properties -------------------------------------------------------------------------------


def test_raw_http_of_any_shape_never_gets_a_5xx(served: dict[str, Any]) -> None:
    server = served["server"]

    @FUZZ
    @given(data=raw_requests())
    def case(data: bytes) -> None:
        reply = _exchange(server, data)
        for status in _statuses(reply):
            assert status < 500, reply[:2000]
        _still_serving(server)

    case()
    assert _server_errors(server) == 0


def _server_errors(server: ServerThread) -> float:
    """5xx responses the server counted, including ones a vanished client never read."""
    text = httpx.get(f"{_root(server)}/metrics", timeout=TIMEOUT_S).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "understudy_http_requests_total" and s.labels["code"].startswith("5")
    )


def test_generated_chat_requests_get_an_answer_or_a_4xx(served: dict[str, Any]) -> None:
    server = served["server"]
    url = f"{server.base_url}/chat/completions"

    @FUZZ
    @given(obj=request_objects(), stream=st.booleans(), auth=st.none() | any_text)
    # found by bench/fuzz.py: an all-space header value, which the client itself refuses to send
    @example(obj={"messages": [{"role": "developer", "content": "x"}]}, stream=False, auth=" ")
    def case(obj: dict[str, Any], stream: bool, auth: str | None) -> None:
        if stream and isinstance(obj, dict):
            obj["stream"] = True
        headers = {"content-type": "application/json"}
        # a header value is printable ASCII without surrounding whitespace (HTTP strips it, and
        # the client refuses a value that is only whitespace)
        if auth is not None and auth.isascii() and auth.isprintable() and auth == auth.strip():
            headers["authorization"] = auth  # no key is configured: ignored
        with httpx.stream(
            "POST", url, content=encode(obj), headers=headers, timeout=TIMEOUT_S
        ) as resp:
            body = resp.read()
        assert resp.status_code < 500, body[:2000]
        if resp.status_code >= 400:
            err = json.loads(body)["error"]
            assert err["message"] and set(err) == {"message", "type", "param", "code"}
        elif resp.headers["content-type"].startswith("text/event-stream"):
            events = [ln[6:] for ln in body.decode().split("\n") if ln.startswith("data: ")]
            assert events[-1] == "[DONE]"
            for e in events[:-1]:
                assert "error" not in json.loads(e), e
        else:
            assert isinstance(json.loads(body)["choices"][0]["message"]["content"], str)

    case()
    _still_serving(server)
    assert _server_errors(server) == 0
    served["recorder"].flush()
