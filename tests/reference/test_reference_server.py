"""The reference HTTP server: hostile requests, strict validation, limits, tenants.

The server runs in a thread of this process (Starlette on uvicorn, short timeouts), and
raw sockets send what no well-behaved client would. Every answer must be a complete HTTP
response with a JSON error body; no 5xx, no dropped connection, nothing logged as an error.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import pytest
import requests

from pytest_rkv.reference.runtime import MicroRuntime
from pytest_rkv.reference.server import Limits, serve
from pytest_rkv.reference.tenants import Tenancy

TOKEN_A, TOKEN_B, ADMIN = "token-of-tenant-a", "token-of-tenant-b", "the-admin-token"
LIMITS = Limits(max_body_bytes=64 * 1024, header_timeout_s=1.0, body_timeout_s=1.0, keep_alive_s=2.0)


def _start(tenancy: Tenancy, limits: Limits = LIMITS):
    runtime = MicroRuntime(tenancy=tenancy.enabled, tenant_budget_blocks=60 if tenancy.enabled else None,
                           fault_injection=tenancy.admin_token is not None)
    server = serve(runtime, tenancy=tenancy, limits=limits)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    deadline = time.monotonic() + 10
    while not server.uvicorn.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, thread, host, port


@pytest.fixture(scope="module")
def tenant_server():
    server, thread, host, port = _start(Tenancy({TOKEN_A: "a", TOKEN_B: "b"}, ADMIN))
    yield host, port
    server.shutdown()
    thread.join(10)
    server.server_close()


@pytest.fixture
def url(tenant_server):
    host, port = tenant_server
    requests.post(f"http://{host}:{port}/v1/kv/reset", headers=_auth(ADMIN), timeout=5).raise_for_status()
    return f"http://{host}:{port}"


@pytest.fixture
def errors_logged(caplog):
    """Records at ERROR or above, or carrying a traceback, from any logger (uvicorn, asyncio, ours)."""
    caplog.set_level(logging.WARNING)
    return lambda: [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- a raw client ----------------------------------------------------------------------------


def exchange(host: str, port: int, raw: bytes, wait: float = 5.0, then_send: bytes = b"") -> list[dict]:
    """Send `raw`, read every response until the server closes or goes quiet; each
    response as {"status", "headers", "body"}. Raises if a response is cut short."""
    with socket.create_connection((host, port), timeout=wait) as sock:
        sock.sendall(raw)
        if then_send:
            sock.sendall(then_send)
        data = b""
        sock.settimeout(wait)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            except ConnectionResetError:
                raise AssertionError(f"connection reset after {len(data)} bytes") from None
            if not chunk:
                break
            data += chunk
            if _complete(data) and not then_send:
                sock.settimeout(0.3)  # anything more (a smuggled second answer) comes now
    return _parse(data)


def _complete(data: bytes) -> bool:
    try:
        _parse(data)
        return True
    except AssertionError:
        return False


def _parse(data: bytes) -> list[dict]:
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        assert len(rest) >= length, f"body cut short: {len(rest)} of {length} bytes"
        responses.append({"status": status, "headers": headers, "body": rest[:length]})
        data = rest[length:]
    assert responses, "no response at all"
    return responses


def _error_type(response: dict) -> str:
    assert response["headers"].get("content-type", "").startswith("application/json"), response
    error = json.loads(response["body"])["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error["type"]


# -- the hostile-request corpus --------------------------------------------------------------

LONG = b"a" * 70_000
HOSTILE: dict[str, tuple[bytes, set[int]]] = {
    "garbage request line": (b"GARBAGE\r\n\r\n", {400}),
    "binary noise": (bytes(range(256)) + b"\r\n\r\n", {400}),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 404}),  # h11 reads it as method PRI
    "HTTP/9.9": (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", {200, 400}),  # h11 answers any 1.x-like version
    "HTTP/0.9 style": (b"GET /health\r\n\r\n", {400}),
    "65 KB request line": (b"GET /" + LONG + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
    "65 KB header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + LONG + b"\r\n\r\n", {431}),
    "10 KB URL": (b"GET /v1/kv/claims/" + b"c" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", {414}),
    "Content-Length abc": (b"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", {400}),
    "Content-Length 1e3": (b"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n{}", {400}),
    "Content-Length 10^20": (b"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000000000000000\r\n\r\n{}",
                             {400, 413}),
    "Content-Length negative": (b"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", {400}),
    "two Content-Lengths": (b"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
                            {400}),
    "bad chunked body": (b"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
                         {400}),
    "body over the limit": (b"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\nAuthorization: Bearer "
                            + TOKEN_A.encode() + b"\r\n\r\n" + LONG[:70_000],
                            {413}),
    "chunked body over the limit": (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                    b"Authorization: Bearer " + TOKEN_A.encode() + b"\r\n\r\n"
                                    + b"".join(b"4000\r\n" + b" " * 0x4000 + b"\r\n" for _ in range(5)) + b"0\r\n\r\n",
                                    {413}),
    "null byte in a header": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", {400}),
    "header without colon": (b"GET /health HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n", {400}),
    "obsolete line folding": (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n\r\n", {200, 400}),
    "non-ASCII path": (b"GET /v1/kv/claims/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n", {400, 404}),
    "NUL in path": (b"GET /v1/kv/claims/%00 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + TOKEN_A.encode()
                    + b"\r\n\r\n", {404}),
    "path traversal": (b"GET /v1/kv/../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n", {404}),
    "no Host": (b"GET /health HTTP/1.1\r\n\r\n", {400}),
    "unknown route": (b"GET /v1/kv/nothing HTTP/1.1\r\nHost: x\r\n\r\n", {404}),
    "PUT": (b"PUT /v1/kv/claims HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", {405}),
    "PATCH": (b"PATCH /v1/kv/pool HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", {405}),
    "OPTIONS": (b"OPTIONS /v1/kv/claims HTTP/1.1\r\nHost: x\r\n\r\n", {405}),
    "TRACE": (b"TRACE /health HTTP/1.1\r\nHost: x\r\n\r\n", {405}),
    "made-up method": (b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n", {405}),
    "no token": (b"GET /v1/kv/pool HTTP/1.1\r\nHost: x\r\n\r\n", {401}),
    "Basic auth": (b"GET /v1/kv/pool HTTP/1.1\r\nHost: x\r\nAuthorization: Basic dTpw\r\n\r\n", {401}),
    "unknown token": (b"GET /v1/kv/pool HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer nope-nope-nope\r\n\r\n", {401}),
}
JSON_BODIES: dict[str, tuple[str, bytes]] = {
    "Infinity ttl": ("/v1/kv/claims", b'{"prompt_token_ids": [1, 2], "ttl_s": Infinity}'),
    "NaN ttl": ("/v1/kv/claims", b'{"prompt_token_ids": [1, 2], "ttl_s": NaN}'),
    "1e400 ttl": ("/v1/kv/claims", b'{"prompt_token_ids": [1, 2], "ttl_s": 1e400}'),
    "string token id": ("/v1/kv/claims", b'{"prompt_token_ids": ["1"]}'),
    "float token id": ("/v1/kv/claims", b'{"prompt_token_ids": [1e3]}'),
    "bool token id": ("/v1/kv/claims", b'{"prompt_token_ids": [true]}'),
    "huge token id": ("/v1/kv/claims", b'{"prompt_token_ids": [99999999999999999999999]}'),
    "string bool": ("/v1/kv/claims", b'{"prompt_token_ids": [1], "demotable": "yes"}'),
    "int bool": ("/v1/kv/claims", b'{"prompt_token_ids": [1], "demotable": 1}'),
    "string max_tokens": ("/v1/completions", b'{"prompt": [1], "max_tokens": "2"}'),
    "deep nesting": ("/v1/completions", b'{"prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"),
    "invalid UTF-8": ("/v1/completions", b'{"prompt": [1], "model": "\xff\xfe"}'),
    "not an object": ("/v1/completions", b"[1, 2, 3]"),
    "empty body": ("/v1/completions", b""),
    "truncated JSON": ("/v1/completions", b'{"prompt": [1,'),
    "duplicate-key trick": ("/v1/kv/claims", b'{"prompt_token_ids": [1], "strength": "hard", "strength": "firm"}'),
    "overlong client id": ("/v1/kv/claims", b'{"prompt_token_ids": [1], "client_id": "' + b"x" * 300 + b'"}'),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_gets_a_json_error_and_no_5xx(tenant_server, errors_logged, name):
    raw, expected = HOSTILE[name]
    host, port = tenant_server
    responses = exchange(host, port, raw)
    first = responses[0]
    assert first["status"] < 500, f"{name}: {first}"
    assert first["status"] in expected, f"{name}: got {first['status']} {first['body'][:200]!r}"
    if first["status"] >= 400:
        _error_type(first)
    else:
        json.loads(first["body"])
    assert not errors_logged(), [r.getMessage() for r in errors_logged()]


@pytest.mark.parametrize("name", sorted(JSON_BODIES))
def test_loose_or_hostile_json_is_422_with_nothing_stored(tenant_server, errors_logged, name):
    path, body = JSON_BODIES[name]
    host, port = tenant_server
    raw = (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n"
           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    (response,) = exchange(host, port, raw)
    assert response["status"] == 422, f"{name}: {response['status']} {response['body'][:300]!r}"
    assert _error_type(response) == "invalid_request"
    pool = requests.get(f"http://{host}:{port}/v1/kv/pool", headers=_auth(ADMIN), timeout=5).json()
    assert pool["claimed_blocks"] == {}
    assert not errors_logged()


def test_a_body_on_a_bodiless_route_is_never_run_as_a_second_request(url, tenant_server):
    host, port = tenant_server
    smuggled = b"POST /v1/kv/reset HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN.encode() + b"\r\n\r\n"
    raw = (f"GET /v1/kv/pool HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n"
           f"Content-Length: {len(smuggled)}\r\n\r\n").encode() + smuggled
    mark = requests.get(url + "/v1/kv/events", headers=_auth(ADMIN), timeout=5).json()["last_seq"]
    responses = exchange(host, port, raw, wait=2.0)
    assert [r["status"] for r in responses] == [200]
    after = requests.get(url + f"/v1/kv/events?after={mark}", headers=_auth(ADMIN), timeout=5).json()
    assert after["events"] == [], "the body was executed as a request"


def test_partial_headers_get_408_and_the_connection_is_closed(tenant_server, errors_logged):
    host, port = tenant_server
    start = time.monotonic()
    (response,) = exchange(host, port, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", wait=LIMITS.header_timeout_s + 3)
    assert response["status"] == 408 and _error_type(response) == "timeout"
    assert time.monotonic() - start < LIMITS.header_timeout_s + 2


def test_a_body_shorter_than_its_content_length_gets_408(tenant_server):
    host, port = tenant_server
    raw = (f"POST /v1/kv/claims HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN_A}\r\n"
           f"Content-Length: 500\r\n\r\n").encode() + b'{"prompt_token_ids": ['
    (response,) = exchange(host, port, raw, wait=LIMITS.body_timeout_s + 3)
    assert response["status"] == 408 and _error_type(response) == "timeout"


def test_sixty_stalled_connections_are_all_closed(tenant_server):
    host, port = tenant_server
    socks = [socket.create_connection((host, port), timeout=5) for _ in range(60)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")
        time.sleep(LIMITS.header_timeout_s + 1.5)
        for sock in socks:
            sock.settimeout(2)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            assert data == b"" or data.startswith(b"HTTP/1.1 408"), data[:100]
    finally:
        for sock in socks:
            sock.close()
    assert requests.get(f"http://{host}:{port}/health", timeout=5).status_code == 200


def test_keep_alive_connections_are_closed_after_the_request_limit():
    server, thread, host, port = _start(Tenancy(), Limits(requests_per_connection=3))
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            statuses = []
            for _ in range(3):
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not _complete(data):
                    data += sock.recv(4096)
                statuses.append((_parse(data)[0]["status"], _parse(data)[0]["headers"].get("connection")))
            assert statuses[:2] == [(200, None), (200, None)] and statuses[2] == (200, "close")
            assert sock.recv(4096) == b""
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


# -- tenants, tokens, admin routes, seq ---------------------------------------------------------


def _claim(url: str, token: str, tokens: list[int]) -> dict:
    resp = requests.post(url + "/v1/kv/claims", json={"prompt_token_ids": tokens}, headers=_auth(token), timeout=5)
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_tenant_b_cannot_read_release_or_see_tenant_a(url):
    a = _claim(url, TOKEN_A, list(range(1, 161)))
    for method in ("GET", "DELETE"):
        resp = requests.request(method, url + f"/v1/kv/claims/{a['claim_id']}", headers=_auth(TOKEN_B), timeout=5)
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found"
    b_events = requests.get(url + "/v1/kv/events", headers=_auth(TOKEN_B), timeout=5).json()["events"]
    assert [e["type"] for e in b_events] == ["runtime.reset"]
    b_claims = requests.get(url + "/v1/kv/claims", headers=_auth(TOKEN_B), timeout=5).json()["claims"]
    assert b_claims == []
    b_pool = requests.get(url + "/v1/kv/pool", headers=_auth(TOKEN_B), timeout=5).json()
    assert b_pool["claimed_blocks"] == {} and b_pool["tenant_budget_blocks"] == 60
    same = requests.post(url + "/v1/completions", json={"prompt": list(range(1, 162))},
                         headers=_auth(TOKEN_B), timeout=5).json()
    assert same["usage"]["prompt_tokens_details"]["cached_tokens"] == 0, "tenants share cached prefixes"
    assert same["rkv"]["reuse"] == []
    mine = requests.get(url + f"/v1/kv/claims/{a['claim_id']}", headers=_auth(TOKEN_A), timeout=5).json()
    assert mine["state"] == "resident" and mine["tenant"] == "a"


def test_a_claim_naming_another_tenant_is_forbidden(url):
    resp = requests.post(url + "/v1/kv/claims", json={"prompt_token_ids": list(range(32)), "tenant": "b"},
                         headers=_auth(TOKEN_A), timeout=5)
    assert resp.status_code == 403 and resp.json()["error"]["type"] == "forbidden"


def test_a_refusal_counts_but_does_not_name_another_tenants_claims(url):
    a = _claim(url, TOKEN_A, list(range(1, 60 * 16 + 1)))
    resp = requests.post(url + "/v1/completions", json={"prompt": list(range(5000, 5000 + 70 * 16))},
                         headers=_auth(TOKEN_B), timeout=5)
    error = resp.json()["error"]
    assert resp.status_code == 409 and error["type"] == "active_refusal"
    assert error["blocking_claims"] == [] and a["claim_id"] not in json.dumps(error)
    assert error["claimed_blocks"] == {"(another tenant)": 60}


@pytest.mark.parametrize("path, body", [("/v1/kv/reset", None), ("/v1/kv/faults", {"kind": "fail_next_restore"})])
def test_admin_routes_refuse_tenant_tokens_and_no_token(url, path, body):
    for headers, status in ((_auth(TOKEN_A), 403), ({}, 401), (_auth("wrong-token-123"), 401)):
        resp = requests.post(url + path, json=body, headers=headers, timeout=5)
        assert resp.status_code == status, (headers, resp.text)
        assert resp.json()["error"]["type"] in ("forbidden", "unauthorized")
    assert requests.post(url + path, json=body, headers=_auth(ADMIN), timeout=5).status_code == 200


def test_admin_routes_are_off_without_an_admin_token():
    server, thread, host, port = _start(Tenancy())
    try:
        for path in ("/v1/kv/reset", "/v1/kv/faults"):
            resp = requests.post(f"http://{host}:{port}{path}", json={"kind": "fail_next_restore"}, timeout=5)
            assert resp.status_code == 501 and resp.json()["error"]["type"] == "unsupported"
        info = requests.get(f"http://{host}:{port}/v1/kv/info", timeout=5).json()
        assert info["fault_injection"] is False and info["tenancy"] is False
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


def test_seq_never_restarts_and_a_reset_is_an_event(url):
    _claim(url, TOKEN_A, list(range(64)))
    before = requests.get(url + "/v1/kv/events", headers=_auth(ADMIN), timeout=5).json()
    requests.post(url + "/v1/kv/reset", headers=_auth(ADMIN), timeout=5).raise_for_status()
    after = requests.get(url + "/v1/kv/events", headers=_auth(TOKEN_A), timeout=5).json()
    assert [e["type"] for e in after["events"]] == ["runtime.reset"]
    assert after["events"][0]["seq"] == before["last_seq"] + 1
    assert after["oldest_seq"] == after["events"][0]["seq"]
    stale = requests.get(url + f"/v1/kv/events?after={before['last_seq']}", headers=_auth(TOKEN_A), timeout=5).json()
    assert [e["type"] for e in stale["events"]] == ["runtime.reset"], "a poller at after=N misses the reset"


def test_events_come_in_pages(url):
    for i in range(3):
        _claim(url, TOKEN_A, list(range(100 * i, 100 * i + 32)))
    first = requests.get(url + "/v1/kv/events?limit=2", headers=_auth(TOKEN_A), timeout=5).json()
    assert len(first["events"]) == 2 and first["more"] is True
    rest = requests.get(url + f"/v1/kv/events?after={first['last_seq']}&limit=1000",
                        headers=_auth(TOKEN_A), timeout=5).json()
    seqs = [e["seq"] for e in first["events"] + rest["events"]]
    assert seqs == sorted(set(seqs)) and rest["more"] is False
    for query in ("limit=0", "limit=1001", "after=-1", "after=1e3", "after=1&after=2", "limit=abc"):
        resp = requests.get(url + f"/v1/kv/events?{query}", headers=_auth(TOKEN_A), timeout=5)
        assert resp.status_code == 422 and resp.json()["error"]["type"] == "invalid_request", query


def test_tenant_budget_names_itself_and_leaves_room_for_others(url):
    _claim(url, TOKEN_B, list(range(60 * 16)))
    over = requests.post(url + "/v1/kv/claims", json={"prompt_token_ids": list(range(7000, 7016))},
                         headers=_auth(TOKEN_B), timeout=5)
    assert over.status_code == 409 and over.json()["error"]["reason"].startswith("tenant claim budget")
    _claim(url, TOKEN_A, list(range(9000, 9000 + 4 * 16)))
    global_over = requests.post(url + "/v1/kv/claims", json={"prompt_token_ids": list(range(8000, 8016))},
                                headers=_auth(TOKEN_A), timeout=5)
    assert global_over.status_code == 409 and global_over.json()["error"]["reason"].startswith("global claim budget")


def test_ended_claims_are_pruned_after_the_retention_time():
    from pytest_rkv.contract import ClaimRequest
    from pytest_rkv.reference.runtime import FakeClock

    clock = FakeClock()
    rt = MicroRuntime(clock=clock, claim_retention_s=60.0, ended_claims_kept=10)
    ids = [rt.create_claim(ClaimRequest(prompt_token_ids=list(range(i, i + 16)))).claim_id for i in range(20)]
    for claim_id in ids:
        rt.release_claim(claim_id)
    rt.pool_state()  # every operation prunes first
    assert len(rt.claims) == 10, "more ended claims kept than the count limit"
    clock.advance(61)
    rt.pool_state()
    assert rt.claims == {}
