"""The API client's edges: statuses, retries and their counting, Retry-After, caps, bodies, the limiter,
transport failures, and a canary token that must never show up in an error or a log line."""

from __future__ import annotations

import email.utils
import json
import logging
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
import responses

from exlogare_exporter import __version__, deadline
from exlogare_exporter.client import (
    RETRY_AFTER_CAP,
    AuthError,
    BadRequest,
    ExlogareClient,
    ExlogareRetry,
    InvalidBody,
    RateLimited,
    RetryHooks,
    ServerError,
    TokenBucket,
    TransportError,
    UpstreamError,
    endpoint_label,
    parse_retry_after,
)
from exlogare_exporter.parse import Overview, parse_overview, parse_top_projects
from exlogare_exporter.secrets import Secret

CANARY = "exl_CANARY_9f8e7d6c5b4a3210"
BASE = "https://exlogare.test"
OVERVIEW_URL = BASE + "/api/v1/stats/overview"
OVERVIEW = {"failures_detected": 4, "analyses_completed": 3, "rca_count": 3, "severity_counts": {"high": 3},
            "avg_time_to_rca_seconds": None, "p50_time_to_rca_seconds": None, "p90_time_to_rca_seconds": None,
            "window_days": 7}


@dataclass(frozen=True)
class Tenant:
    """The attributes of config.TenantConfig that the client reads."""

    name: str = "acme"
    base_url: str = BASE
    token: Secret = field(default_factory=lambda: Secret(CANARY))
    timeout: float = 10.0
    connect_timeout: float = 3.0
    retries: int = 2
    ca_file: str | None = None
    max_response_bytes: int = 1_000_000
    max_requests_per_second: float = 0.0
    max_requests_burst: float = 1.0


class FakeClock:
    """A monotonic clock that only moves when something sleeps on it."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.slept: list[float] = []
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self.now += seconds


class Recorder:
    def __init__(self) -> None:
        self.codes: list[tuple[str, str]] = []

    def __call__(self, endpoint: str, code: str) -> None:
        self.codes.append((endpoint, code))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def seen() -> Recorder:
    return Recorder()


@pytest.fixture
def make(clock: FakeClock, seen: Recorder) -> Iterator[Any]:
    clients: list[ExlogareClient] = []

    def factory(limiter: Any = None, **changes: Any) -> ExlogareClient:
        client = ExlogareClient(Tenant(**changes), on_response=seen, limiter=limiter, clock=clock,
                                sleep=clock.sleep)
        clients.append(client)
        return client

    yield factory
    for client in clients:
        client.close()


def get_overview(client: ExlogareClient) -> Overview:
    return client.get("/stats/overview", {"days": 7}, parse_overview)


def fail(client: ExlogareClient, endpoint: str = "/stats/overview") -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        client.get(endpoint, {"days": 7}, parse_overview)
    return info.value


# --- the happy path --------------------------------------------------------------------------------------


@responses.activate
def test_success_sends_headers_and_params_and_counts_one_request(make: Any, seen: Recorder) -> None:
    responses.add(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    result = get_overview(make(ca_file="/etc/ssl/exlogare-ca.pem"))
    assert result.failures_detected == 4 and result.severity_counts[-1] == ("high", 3)
    assert seen.codes == [("overview", "200")]
    request = responses.calls[0].request
    assert request.url == OVERVIEW_URL + "?days=7"
    assert request.headers["Authorization"] == f"Bearer {CANARY}"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == (
        f"exlogare-exporter/{__version__} (+https://github.com/exlogare/exlogare-exporter)")
    assert request.req_kwargs["verify"] == "/etc/ssl/exlogare-ca.pem"
    assert request.req_kwargs["timeout"] == (3.0, 10.0)


@responses.activate
def test_verify_defaults_to_true_and_base_path_prefix_is_kept(make: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)  # requests would substitute it for True
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    responses.add(responses.GET, "http://lan.test:8080/exlogare/api/v1/stats/top-projects", json=[])
    client = make(base_url="http://lan.test:8080/exlogare/")
    result = client.get("/stats/top-projects", {"days": 7, "limit": 5}, lambda o: parse_top_projects(o, 80))
    assert result == ()
    assert responses.calls[0].request.req_kwargs["verify"] is True


def test_retry_is_urllib3_retry_mounted_on_the_adapter(make: Any) -> None:
    client = make(retries=4)
    for scheme in ("http://x", "https://x"):
        retry = client._session.get_adapter(scheme).max_retries
        assert isinstance(retry, ExlogareRetry)
        assert retry.total == 4
        assert set(retry.status_forcelist) == {429, 500, 502, 503, 504}
        assert retry.respect_retry_after_header is True
        assert 0 < retry.backoff_max <= 10 and retry.backoff_factor > 0 and retry.backoff_jitter > 0
        assert retry.allowed_methods == frozenset({"GET"})
        assert isinstance(retry.new(total=1).hooks, RetryHooks)  # carried through new()


# --- statuses --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "body", "cls", "detail", "hint"), [
    (400, {"detail": "Invalid cursor"}, BadRequest, "Invalid cursor", ""),
    (404, {"detail": "Not found"}, BadRequest, "Not found", ""),
    (422, {"detail": [{"loc": ["query", "days"], "msg": "Input should be less than or equal to 180",
                       "type": "less_than_equal"},
                      {"loc": ["query", "limit"], "msg": "Input should be greater than 0", "type": "x"}]},
     BadRequest, "query.days: Input should be less than or equal to 180; "
                 "query.limit: Input should be greater than 0", ""),
    (409, {"detail": "Conflict"}, BadRequest, "Conflict", ""),
    (401, {"detail": "Missing token"}, AuthError, "Missing token", "no token reached the server"),
    (401, {"detail": "Invalid or revoked API token"}, AuthError, "Invalid or revoked API token",
     "unknown or revoked"),
    (401, {"detail": "Malformed token"}, AuthError, "Malformed token", "read tokens start with exl_"),
    (401, {"detail": "Invalid signature"}, AuthError, "Invalid signature", "read tokens start with exl_"),
    (401, "<html>Authorization Required</html>", AuthError, "Authorization Required", ""),
    (403, {"detail": "Missing scope: read"}, AuthError, "Missing scope: read", "lacks the 'read' scope"),
    (403, "Forbidden by WAF", AuthError, "Forbidden by WAF", "lacks the 'read' scope"),
])
@responses.activate
def test_client_errors_are_never_retried(make: Any, seen: Recorder, status: int, body: Any,  # noqa: PLR0917
                                         cls: type[UpstreamError], detail: str, hint: str) -> None:
    kwargs = {"json": body} if isinstance(body, dict) else {"body": body}
    responses.add(responses.GET, OVERVIEW_URL, status=status, **kwargs)
    error = fail(make(retries=3))
    assert type(error) is cls
    assert len(responses.calls) == 1
    assert seen.codes == [("overview", str(status))]
    assert (error.code, error.status, error.tenant, error.endpoint) == (str(status), status, "acme",
                                                                         "/stats/overview")
    assert error.detail == detail
    assert error.hint == hint or (hint and hint in error.hint)
    expected = f"tenant acme: /stats/overview: {status}: {detail}"
    assert str(error) == (f"{expected} ({error.hint})" if error.hint else expected)


@pytest.mark.parametrize(("status", "cls"), [(429, RateLimited), (500, ServerError), (502, ServerError),
                                             (503, ServerError), (504, ServerError)])
@responses.activate
def test_retryable_statuses_are_retried_and_every_attempt_counted(make: Any, seen: Recorder, status: int,
                                                                  cls: type[UpstreamError]) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=status, json={"detail": "busy"})
    error = fail(make(retries=2))
    assert type(error) is cls
    assert len(responses.calls) == 3
    assert seen.codes == [("overview", str(status))] * 3
    assert error.code == str(status) and error.detail == "busy" and error.retry_after is None


@responses.activate
def test_retry_then_success_counts_each_attempt(make: Any, seen: Recorder) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=503, body="upstream trouble")
    responses.add(responses.GET, OVERVIEW_URL, status=502, body="upstream trouble")
    responses.add(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    assert get_overview(make(retries=3)).analyses_completed == 3
    assert seen.codes == [("overview", "503"), ("overview", "502"), ("overview", "200")]


@responses.activate
def test_zero_retries_means_one_attempt(make: Any, seen: Recorder) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=500, body="")
    error = fail(make(retries=0))
    assert isinstance(error, ServerError)
    assert error.detail == "Internal Server Error"  # empty body: the reason phrase
    assert seen.codes == [("overview", "500")]


@responses.activate
def test_error_status_with_html_body_keeps_status_and_a_short_excerpt(make: Any, seen: Recorder) -> None:
    page = ("<html>\n<head><title>502 Bad Gateway</title><style>body{color:red}</style></head>\n"
            "<body>\n<center><h1>502 Bad Gateway</h1></center>\n<hr><center>nginx/1.24.0</center>\n"
            + "<!-- padding -->" * 500 + "</body></html>")
    responses.add(responses.GET, OVERVIEW_URL, status=502, body=page, content_type="text/html")
    error = fail(make(retries=0))
    assert isinstance(error, ServerError) and error.code == "502"
    assert error.detail.startswith("502 Bad Gateway 502 Bad Gateway nginx/1.24.0")
    assert "<" not in error.detail and "\n" not in error.detail and len(error.detail) <= 200
    assert seen.codes == [("overview", "502")]


@responses.activate
def test_analysis_endpoint_label(make: Any, seen: Recorder) -> None:
    responses.add(responses.GET, BASE + "/api/v1/analyses/39af", status=404, json={"detail": "Not found"})
    error = fail(make(), "/analyses/39af")
    assert isinstance(error, BadRequest) and error.endpoint == "/analyses/39af"
    assert seen.codes == [("analysis", "404")]


# --- Retry-After -----------------------------------------------------------------------------------------


@responses.activate
def test_short_retry_after_is_retried(make: Any, seen: Recorder) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=429, headers={"Retry-After": "5"})
    responses.add(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    assert get_overview(make(retries=1)).failures_detected == 4
    assert seen.codes == [("overview", "429"), ("overview", "200")]


@pytest.mark.parametrize(("status", "cls"), [(429, RateLimited), (503, ServerError)])
@responses.activate
def test_long_retry_after_is_not_slept_through_and_blocks_the_tenant(make: Any, seen: Recorder,
                                                                      clock: FakeClock, status: int,
                                                                      cls: type[UpstreamError]) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=status, headers={"Retry-After": "120"},
                  json={"detail": "slow down"})
    client = make(retries=3)
    error = fail(client)
    assert type(error) is cls and error.retry_after == 120.0
    assert len(responses.calls) == 1  # over the cap: no retry, no sleep
    assert clock.slept == []
    assert seen.codes == [("overview", str(status))]

    clock.now += 119.0
    held = fail(client)
    assert isinstance(held, RateLimited)
    assert held.code == "429" and held.status is None and held.retry_after == pytest.approx(1.0)
    assert "acme" in str(held)
    assert len(responses.calls) == 1  # no network call
    assert seen.codes == [("overview", str(status))]  # and no upstream request counted

    clock.now += 1.5
    responses.replace(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    assert get_overview(client).failures_detected == 4
    assert len(responses.calls) == 2


@responses.activate
def test_final_429_with_short_retry_after_still_blocks_until_it_expires(make: Any, clock: FakeClock) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=429, headers={"Retry-After": "7"})
    client = make(retries=0)
    assert fail(client).retry_after == 7.0
    clock.now += 6.0
    assert isinstance(fail(client, "/stats/timeseries"), RateLimited)  # the whole tenant waits
    assert len(responses.calls) == 1


@responses.activate
def test_a_runaway_retry_after_holds_the_tenant_back_for_at_most_an_hour(make: Any, clock: FakeClock) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=429, headers={"Retry-After": "31536000"})
    responses.add(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    client = make(retries=0)
    assert fail(client).retry_after == 31536000.0  # the upstream's figure is reported as it was
    clock.now += 3599.0
    assert isinstance(fail(client), RateLimited)
    clock.now += 2.0
    assert get_overview(client).failures_detected == 4


@pytest.mark.parametrize("headers", [{}, {"Retry-After": "soon"}])
@responses.activate
def test_no_usable_retry_after_means_no_block(make: Any, headers: dict[str, str]) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=429, headers=headers)
    responses.add(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    client = make(retries=0)
    error = fail(client)
    assert isinstance(error, RateLimited) and error.retry_after is None
    assert get_overview(client).failures_detected == 4


@responses.activate
def test_503_without_retry_after_does_not_block(make: Any) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=503)
    responses.add(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    client = make(retries=0)
    assert isinstance(fail(client), ServerError)
    assert get_overview(client).failures_detected == 4


class _FakeResponse:
    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers

    def get_redirect_location(self) -> bool:
        return False


def _retry(sleeps: list[float], codes: list[str], cap: float = RETRY_AFTER_CAP, **kw: Any) -> ExlogareRetry:
    hooks = RetryHooks(on_retry=codes.append, sleep=sleeps.append, retry_after_cap=cap,
                       wall_clock=lambda: 1_700_000_000.0)
    defaults: dict[str, Any] = {"total": 3, "status_forcelist": {429, 503}, "raise_on_status": False,
                                "backoff_factor": 0.5, "backoff_max": 10}
    return ExlogareRetry(**{**defaults, **kw}, hooks=hooks)


def test_retry_sleeps_retry_after_through_the_injected_sleep() -> None:
    sleeps: list[float] = []
    codes: list[str] = []
    retry = _retry(sleeps, codes)
    response = _FakeResponse(503, {"Retry-After": "7"})
    retry = retry.increment("GET", "/x", response=response)
    retry.sleep(response)
    assert sleeps == [7.0] and codes == ["503"]


def test_retry_backoff_grows_and_is_capped() -> None:
    sleeps: list[float] = []
    codes: list[str] = []
    retry = _retry(sleeps, codes, total=10)
    response = _FakeResponse(503, {})
    for _ in range(8):
        retry = retry.increment("GET", "/x", response=response)
        retry.sleep(response)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]  # the first retry has no backoff at all
    assert codes == ["503"] * 8


def test_retry_refuses_retry_after_over_the_cap_without_reporting() -> None:
    from urllib3.exceptions import MaxRetryError

    sleeps: list[float] = []
    codes: list[str] = []
    with pytest.raises(MaxRetryError, match="over the 30s cap"):
        _retry(sleeps, codes).increment("GET", "/x", response=_FakeResponse(429, {"Retry-After": "31"}))
    assert sleeps == [] and codes == []  # the client reports the final attempt itself


def test_retry_exhausted_does_not_report_the_last_attempt() -> None:
    from urllib3.exceptions import MaxRetryError

    codes: list[str] = []
    retry = _retry([], codes, total=1)
    retry = retry.increment("GET", "/x", response=_FakeResponse(500, {}))
    with pytest.raises(MaxRetryError):
        retry.increment("GET", "/x", response=_FakeResponse(500, {}))
    assert codes == ["500"]


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("5", 5.0), (" 10 ", 10.0), ("0", 0.0), ("1.5", 1.5), ("-3", None), ("soon", None),
    ("", None),
    (email.utils.formatdate(1_700_000_090, usegmt=True), 90.0),
    (email.utils.formatdate(1_699_999_000, usegmt=True), 0.0),  # a date in the past: go now
])
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, 1_700_000_000.0) == expected


# --- bodies ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Content-Length": "1201"}])
@responses.activate
def test_body_over_the_cap_is_refused(make: Any, seen: Recorder, headers: dict[str, str]) -> None:
    body = json.dumps({**OVERVIEW, "pad": "x" * 2000}).encode()[:1201]
    responses.add(responses.GET, OVERVIEW_URL, body=body, headers=headers)
    error = fail(make(max_response_bytes=1200))
    assert isinstance(error, InvalidBody)
    assert error.code == "invalid_body" and error.status == 200
    assert error.detail == "response larger than 1200 bytes"
    assert seen.codes == [("overview", "invalid_body")]


@responses.activate
def test_body_exactly_at_the_cap_is_read(make: Any) -> None:
    body = json.dumps(OVERVIEW).encode()
    responses.add(responses.GET, OVERVIEW_URL, body=body)
    assert get_overview(make(max_response_bytes=len(body))).failures_detected == 4


@pytest.mark.parametrize(("body", "content_type", "detail"), [
    (b"<!DOCTYPE html><html><head><title>Sign in - Corporate SSO</title></head><body>Please log in</body>",
     "text/html", "an HTML page, expected JSON: 'Sign in - Corporate SSO Please log in'"),
    (b'{"failures_detected": 4, "analyses_comp', "application/json", "not valid JSON (Unterminated string"),
    (b"", "application/json", "empty body, expected JSON"),
    (b'{"failures_detected": NaN}', "application/json", "not valid JSON (NaN is not valid JSON)"),
    (b"\xff\xfe\x00garbage", "application/json", "not valid JSON"),
])
@responses.activate
def test_non_json_200_is_invalid_body(make: Any, seen: Recorder, body: bytes, content_type: str,
                                      detail: str) -> None:
    responses.add(responses.GET, OVERVIEW_URL, body=body, content_type=content_type)
    error = fail(make(retries=2))
    assert isinstance(error, InvalidBody) and error.code == "invalid_body" and error.status == 200
    assert error.detail.startswith(detail)
    assert len(responses.calls) == 1 and seen.codes == [("overview", "invalid_body")]


@responses.activate
def test_wrongly_shaped_200_counts_as_invalid_body(make: Any, seen: Recorder) -> None:
    responses.add(responses.GET, OVERVIEW_URL, json=[{"failures_detected": 4}])
    error = fail(make())
    assert isinstance(error, InvalidBody) and error.code == "invalid_body"
    assert error.detail.startswith("unexpected shape: overview: expected an object, got an array")
    assert seen.codes == [("overview", "invalid_body")]


@pytest.mark.parametrize(("location", "suggestion"), [
    ("https://new.exlogare.test/api/v1/stats/overview?days=7", " (https://new.exlogare.test)"),
    ("/login?next=%2F", ""),
])
@responses.activate
def test_redirect_is_not_followed(make: Any, seen: Recorder, location: str, suggestion: str) -> None:
    responses.add(responses.GET, OVERVIEW_URL, status=301, headers={"Location": location})
    target = responses.add(responses.GET, re.compile(r"https://new\.exlogare\.test/.*"), json=OVERVIEW)
    error = fail(make())
    assert isinstance(error, InvalidBody) and error.code == "301" and error.status == 301
    assert error.detail == (f"the base_url redirects to {location}; set base_url to the final address"
                            + suggestion)
    assert target.call_count == 0 and len(responses.calls) == 1
    assert seen.codes == [("overview", "301")]


# --- transport failures (responses) ----------------------------------------------------------------------


@pytest.mark.parametrize(("exc", "code", "detail"), [
    (requests.exceptions.ReadTimeout("read timed out"), "timeout", "no answer within 10s"),
    (requests.exceptions.ConnectTimeout("connect timed out"), "timeout", "no connection within 3s"),
    (requests.exceptions.ConnectionError("Connection refused"), "connection", "Connection refused"),
    (requests.exceptions.SSLError("certificate verify failed"), "connection", "certificate verify failed"),
])
@responses.activate
def test_transport_errors_are_mapped(make: Any, seen: Recorder, exc: Exception, code: str,
                                     detail: str) -> None:
    responses.add(responses.GET, OVERVIEW_URL, body=exc)
    error = fail(make())
    assert isinstance(error, TransportError) and error.code == code and error.status is None
    assert error.detail == detail
    assert seen.codes == [("overview", code)]


# --- transport failures and retries against real sockets -------------------------------------------------


class _Script:
    """A loopback HTTP server answering from a list of (status, headers, body); the last one repeats."""

    def __init__(self, replies: list[tuple[int, dict[str, str], bytes]], keep_alive: bool = False) -> None:
        self.replies = list(replies)
        self.paths: list[str] = []
        self.peers: list[int] = []  # the client's port of each request: one per connection
        script = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"

            def do_GET(self) -> None:
                script.paths.append(self.path)
                script.peers.append(self.client_address[1])
                replies = script.replies
                status, headers, body = replies.pop(0) if len(replies) > 1 else replies[0]
                self.send_response(status)
                for key, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def script() -> Iterator[Any]:
    servers: list[_Script] = []

    def start(*replies: tuple[int, dict[str, str], bytes], keep_alive: bool = False) -> _Script:
        servers.append(_Script(list(replies), keep_alive))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_real_retry_after_is_slept_through_injected_sleep(make: Any, seen: Recorder, clock: FakeClock,
                                                          script: Any) -> None:
    server = script((503, {"Retry-After": "7"}, b'{"detail": "restarting"}'),
                    (200, {}, json.dumps(OVERVIEW).encode()))
    assert get_overview(make(base_url=server.url, retries=2)).failures_detected == 4
    assert clock.slept == [7.0]
    assert seen.codes == [("overview", "503"), ("overview", "200")]
    assert server.paths == ["/api/v1/stats/overview?days=7"] * 2


def test_real_backoff_between_retries(make: Any, seen: Recorder, clock: FakeClock, script: Any) -> None:
    server = script((500, {}, b"oops"))
    error = fail(make(base_url=server.url, retries=3))
    assert isinstance(error, ServerError) and error.detail == "oops"
    assert seen.codes == [("overview", "500")] * 4
    assert len(clock.slept) == 2  # the first retry goes at once, then exponential backoff with jitter
    assert 1.0 <= clock.slept[0] <= 1.5 and 2.0 <= clock.slept[1] <= 2.5


def test_real_long_retry_after_is_not_retried(make: Any, seen: Recorder, clock: FakeClock,
                                              script: Any) -> None:
    server = script((429, {"Retry-After": "3600"}, b"{}"), (200, {}, json.dumps(OVERVIEW).encode()))
    error = fail(make(base_url=server.url, retries=3))
    assert isinstance(error, RateLimited) and error.retry_after == 3600.0
    assert clock.slept == [] and len(server.paths) == 1
    assert seen.codes == [("overview", "429")]


def test_real_redirect_is_not_followed(make: Any, seen: Recorder, script: Any) -> None:
    server = script((308, {"Location": "https://elsewhere.test/api/v1/stats/overview"}, b""))
    error = fail(make(base_url=server.url))
    assert isinstance(error, InvalidBody) and error.code == "308"
    assert len(server.paths) == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_connection_refused_is_retried_and_counted(make: Any, seen: Recorder) -> None:
    error = fail(make(base_url=f"http://127.0.0.1:{_free_port()}", retries=2))
    assert isinstance(error, TransportError) and error.code == "connection"
    assert "refused" in error.detail.lower()
    assert seen.codes == [("overview", "connection")] * 3


def test_tls_failure_is_a_connection_error_and_not_retried(make: Any, seen: Recorder, script: Any) -> None:
    server = script((200, {}, b"{}"))  # plain HTTP: the TLS handshake fails
    error = fail(make(base_url=server.url.replace("http://", "https://"), retries=3))
    assert isinstance(error, TransportError) and error.code == "connection"
    assert "SSL" in error.detail
    assert seen.codes == [("overview", "connection")] and server.paths == []


class _Silent:
    """Accepts connections and never answers: every read times out."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.accepted: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted.append(conn)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


def test_read_timeout_is_retried_and_counted(make: Any, seen: Recorder) -> None:
    silent = _Silent()
    try:
        error = fail(make(base_url=silent.url, retries=1, timeout=0.2))
    finally:
        silent.close()
    assert isinstance(error, TransportError) and error.code == "timeout"
    assert error.detail == "no answer within 0.2s"
    assert seen.codes == [("overview", "timeout")] * 2
    assert len(silent.accepted) == 2


# --- the rate limiter ------------------------------------------------------------------------------------


def test_token_bucket_bursts_then_spaces_requests() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(2.0, clock=clock, sleep=clock.sleep)
    assert [bucket.acquire() for _ in range(4)] == [0.0, 0.0, 0.5, 0.5]
    assert clock.now == 1.0
    clock.now += 100.0  # a long idle spell refills only up to the burst
    assert [bucket.acquire() for _ in range(3)] == [0.0, 0.0, 0.5]


def test_token_bucket_below_one_per_second_has_a_burst_of_one() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(0.5, clock=clock, sleep=clock.sleep)
    assert bucket.burst == 1.0
    assert [bucket.acquire() for _ in range(3)] == [0.0, 2.0, 2.0]


def test_token_bucket_is_thread_safe() -> None:
    clock = FakeClock(0.0)
    waits: list[float] = []
    lock = threading.Lock()

    def record(seconds: float) -> None:  # do not advance the clock: every caller arrives at t=0
        with lock:
            waits.append(seconds)

    bucket = TokenBucket(4.0, clock=clock, sleep=record)
    threads = [threading.Thread(target=bucket.acquire) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    assert sorted(waits) == [k / 4.0 for k in range(1, 9)]  # 4 free, then one reservation per 0.25 s


def test_token_bucket_refuses_a_zero_rate() -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0.0)


@responses.activate
def test_client_waits_for_its_limiter(make: Any, clock: FakeClock) -> None:
    responses.add(responses.GET, OVERVIEW_URL, json=OVERVIEW)
    client = make(max_requests_per_second=1.0)
    get_overview(client)
    get_overview(client)
    assert clock.slept == [1.0]


def test_client_uses_an_injected_limiter_for_every_attempt(make: Any, script: Any) -> None:
    class Counting:
        calls = 0

        def acquire(self) -> float:
            Counting.calls += 1
            return 0.0

    server = script((503, {}, b""), (200, {}, json.dumps(OVERVIEW).encode()))
    get_overview(make(limiter=Counting(), base_url=server.url, max_requests_per_second=0.0, retries=1))
    assert Counting.calls == 2  # the first attempt and the retry
    assert len(server.paths) == 2


# --- labels ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "label"), [
    ("/stats/overview", "overview"), ("/stats/timeseries", "timeseries"),
    ("/stats/top-projects", "top_projects"),
    ("/stats/top-root-causes", "top_root_causes"), ("/analyses", "analyses"),
    ("/analyses/39af2c01-0000-4000-8000-000000000001", "analysis"),
])
def test_endpoint_label(path: str, label: str) -> None:
    assert endpoint_label(path) == label


@pytest.mark.parametrize("path", ["/analyses/", "/analyses/a/b", "/stats", "stats/overview",
                                  "/api/v1/analyses"])
def test_endpoint_label_refuses_other_paths(path: str) -> None:
    with pytest.raises(ValueError, match="not an Exlogare"):
        endpoint_label(path)


# --- the canary ------------------------------------------------------------------------------------------


def _assert_no_canary(error: UpstreamError) -> None:
    for text in (str(error), repr(error), repr(error.args), error.detail, error.hint, error.endpoint):
        assert CANARY not in text
        assert CANARY[4:] not in text


@pytest.mark.parametrize(("status", "headers", "body"), [
    (401, {}, json.dumps({"detail": f"Malformed token {CANARY}"})),
    (403, {}, json.dumps({"detail": "Missing scope: read"})),
    (422, {}, json.dumps({"detail": [{"loc": ["header", CANARY], "msg": f"bad {CANARY}", "type": "x"}]})),
    (500, {}, f"<html><pre>Authorization: Bearer {CANARY}</pre></html>"),  # a proxy echoing headers
    (502, {}, f"upstream said Bearer {CANARY}\n" * 3),
    (429, {"Retry-After": "120"}, f"slow down {CANARY}"),
    (302, {"Location": f"https://sso.test/login?token={CANARY}"}, ""),
    (200, {}, f"<html>{CANARY}</html>"),
    (200, {}, json.dumps([CANARY])),
])
@responses.activate
def test_canary_token_never_leaks_from_status_errors(make: Any, caplog: pytest.LogCaptureFixture, status: int,
                                                     headers: dict[str, str], body: str) -> None:
    caplog.set_level(logging.DEBUG)
    responses.add(responses.GET, OVERVIEW_URL, status=status, headers=headers, body=body)
    client = make(retries=1)
    error = fail(client)
    _assert_no_canary(error)
    assert responses.calls[0].request.headers["Authorization"] == f"Bearer {CANARY}"  # it was really sent
    if status == 429:
        _assert_no_canary(fail(client))  # and the locally held-back request
    assert CANARY not in caplog.text
    assert CANARY not in repr(client)


@pytest.mark.parametrize("exc", [
    requests.exceptions.ConnectionError(f"could not connect with {CANARY}"),
    requests.exceptions.ReadTimeout(f"timed out {CANARY}"),
])
@responses.activate
def test_canary_token_never_leaks_from_transport_errors(make: Any, caplog: pytest.LogCaptureFixture,
                                                        exc: Exception) -> None:
    caplog.set_level(logging.DEBUG)
    responses.add(responses.GET, OVERVIEW_URL, body=exc)
    error = fail(make())
    _assert_no_canary(error)
    assert error.__cause__ is None and error.__suppress_context__  # no request (with its headers) chained
    assert CANARY not in caplog.text


@responses.activate
def test_a_cut_off_token_in_an_excerpt_is_redacted(make: Any) -> None:
    long_token = "exl_" + "Q7" * 40
    responses.add(responses.GET, OVERVIEW_URL, json=[long_token])  # the shape error quotes ~40 characters
    error = fail(make(token=Secret(long_token)))
    assert isinstance(error, InvalidBody) and "***" in error.detail
    assert "Q7Q7Q7Q7" not in str(error) and "Q7Q7Q7Q7" not in repr(error)


def test_canary_token_never_leaks_in_real_retries(make: Any, caplog: pytest.LogCaptureFixture,
                                                  script: Any) -> None:
    caplog.set_level(logging.DEBUG)  # urllib3 logs each retry at DEBUG and WARNING
    server = script((503, {}, b""))
    error = fail(make(base_url=server.url, retries=2))
    _assert_no_canary(error)
    assert "Retry" in caplog.text  # the logs we checked did record the retries
    assert CANARY not in caplog.text


def test_error_subclasses_share_the_base() -> None:
    for cls in (AuthError, RateLimited, BadRequest, ServerError, TransportError, InvalidBody):
        error = cls("t", "/stats/overview", "x", "d")
        assert isinstance(error, UpstreamError) and str(error) == "tenant t: /stats/overview: x: d"


def test_tenant_stand_in_matches_what_the_client_reads() -> None:
    tenant = replace(Tenant(), name="other")
    client = ExlogareClient(tenant)
    try:
        assert repr(client) == "ExlogareClient(tenant='other')"
    finally:
        client.close()


# --- connections, the environment, URLs --------------------------------------------------------------------


def test_clients_sharing_pools_share_keep_alive_connections(script: Any) -> None:
    server = script((200, {}, json.dumps(OVERVIEW).encode()), keep_alive=True)
    pools = deadline.pool_manager(maxsize=4)
    a, b = (ExlogareClient(Tenant(name=name, base_url=server.url), pools=pools) for name in ("a", "b"))
    try:
        for _ in range(3):
            assert get_overview(a).failures_detected == 4
            assert get_overview(b).failures_detected == 4
        a.close()  # closes its own things, not the connections the others use
        assert get_overview(b).failures_detected == 4
    finally:
        b.close()
    assert len(server.paths) == 7
    assert len(set(server.peers)) == 1  # one connection for both tenants, kept alive throughout
    pools.clear()


def test_a_client_of_its_own_keeps_its_connection_alive(script: Any) -> None:
    server = script((200, {}, json.dumps(OVERVIEW).encode()), keep_alive=True)
    client = ExlogareClient(Tenant(base_url=server.url))
    try:
        for _ in range(3):
            get_overview(client)
    finally:
        client.close()
    assert len(server.peers) == 3 and len(set(server.peers)) == 1


def test_the_environment_proxy_is_honoured(script: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = script((200, {}, json.dumps(OVERVIEW).encode()))  # any HTTP server takes a proxied request
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = ExlogareClient(Tenant(base_url="http://upstream.invalid:8080"))
    try:
        assert get_overview(client).failures_detected == 4
    finally:
        client.close()
    assert proxy.paths == ["http://upstream.invalid:8080/api/v1/stats/overview?days=7"]


def test_no_proxy_is_honoured(script: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    server = script((200, {}, json.dumps(OVERVIEW).encode()))
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{_free_port()}")  # nobody there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = ExlogareClient(Tenant(base_url=server.url))
    try:
        assert get_overview(client).failures_detected == 4
    finally:
        client.close()
    assert server.paths == ["/api/v1/stats/overview?days=7"]


@responses.activate
@pytest.mark.parametrize(("params", "query"), [
    ({"days": 7, "limit": 10}, "?days=7&limit=10"),
    ({"since": "2026-01-01T00:00:00+00:00", "cursor": None}, "?since=2026-01-01T00%3A00%3A00%2B00%3A00"),
    ({"severity": ["low", "high"]}, "?severity=low&severity=high"),  # unhashable: prepared without the cache
    ({}, ""),
])
def test_query_strings_are_what_requests_makes_of_them(make: Any, params: dict[str, Any], query: str) -> None:
    responses.add(responses.GET, BASE + "/api/v1/analyses", json={"items": [], "next_cursor": None})
    client = make()
    for _ in range(2):  # the second time from the cache
        client.get("/analyses", params, lambda o: o)
    assert [c.request.url for c in responses.calls] == [BASE + "/api/v1/analyses" + query] * 2
