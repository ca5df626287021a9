"""HTTP client for one tenant's Exlogare Read API v1.

One `requests.Session` per tenant, whose adapter gets each request directly (the poller's tenants of one
server share its keep-alive connections: a `deadline.pool_manager`). Retries are urllib3's `Retry` (a
subclass that reports every retried attempt and refuses to sleep through a long `Retry-After`); everything
that can go wrong ends as an `UpstreamError` with a short, token-free message that names the tenant.
"""

from __future__ import annotations

import email.utils
import functools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import requests
from requests.auth import AuthBase
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError, ResponseError
from urllib3.exceptions import TimeoutError as Urllib3TimeoutError
from urllib3.poolmanager import PoolManager
from urllib3.util.retry import Retry

from . import __version__, deadline
from .deadline import DeadlineAdapter
from .parse import ShapeError
from .secrets import Secret

if TYPE_CHECKING:
    from .config import TenantConfig

log = logging.getLogger(__name__)

T = TypeVar("T")

USER_AGENT = f"exlogare-exporter/{__version__} (+https://github.com/exlogare/exlogare-exporter)"
API_PREFIX = "/api/v1"
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_AFTER_CAP = 30.0  # seconds: a longer Retry-After is not slept through inside one refresh
BLOCK_MAX = 3600.0  # a runaway Retry-After (a proxy's "come back next year") holds a tenant back at most this
BACKOFF_FACTOR = 0.5
BACKOFF_JITTER = 0.5
BACKOFF_MAX = 10.0
ERROR_BODY_BYTES = 64 * 1024  # an error page is only read for a short detail
DETAIL_MAX_CHARS = 200
_CHUNK_BYTES = 64 * 1024
_REDACT_PREFIX_CHARS = 12  # "exl_" and 8 random characters: enough to recognise a cut-off token

_LABELS = {
    "/stats/overview": "overview",
    "/stats/timeseries": "timeseries",
    "/stats/top-projects": "top_projects",
    "/stats/top-root-causes": "top_root_causes",
    "/analyses": "analyses",
}
_SCOPE = re.compile(r"missing scope:?\s*([\w.:-]+)", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HTML_NOISE = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->", re.IGNORECASE | re.DOTALL)
_HTML_TAG = re.compile(r"<[^>]*(>|$)")  # also a tag cut off at the end of the excerpt


# --- errors ----------------------------------------------------------------------------------------------


class UpstreamError(Exception):
    """A failed call; `code` is the label value for metrics, `str()` the operator's message."""

    def __init__(self, tenant: str, endpoint: str, code: str, detail: str, *, status: int | None = None,
                 retry_after: float | None = None, hint: str = "") -> None:
        self.tenant = tenant
        self.endpoint = endpoint
        self.code = code
        self.status = status
        self.detail = detail
        self.retry_after = retry_after
        self.hint = hint
        message = f"tenant {tenant}: {endpoint}: {code}: {detail}"
        super().__init__(f"{message} ({hint})" if hint else message)


class AuthError(UpstreamError):
    """401/403: the token is wrong or lacks the read scope; retrying cannot help."""


class RateLimited(UpstreamError):  # noqa: N818 - names fixed by docs/architecture.md
    """429, or a request held back locally because the upstream asked for a pause."""


class BadRequest(UpstreamError):  # noqa: N818
    """400/404/422 (and other 4xx): this request is wrong; never retried."""


class ServerError(UpstreamError):
    """5xx after the retries ran out."""


class TransportError(UpstreamError):
    """No HTTP answer: `timeout` or `connection` (refused, DNS, TLS, reset)."""


class InvalidBody(UpstreamError):  # noqa: N818
    """An answer we cannot use: not JSON, too large, wrongly shaped, or an unexpected redirect."""


def endpoint_label(path: str) -> str:
    """The metrics label for an endpoint path below /api/v1 (one label for every `/analyses/<id>`)."""
    if path in _LABELS:
        return _LABELS[path]
    prefix = "/analyses/"
    if path.startswith(prefix) and len(path) > len(prefix) and "/" not in path[len(prefix):]:
        return "analysis"
    raise ValueError(f"not an Exlogare Read API v1 endpoint: {path!r}")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delay-seconds or an HTTP date); None if absent/garbled."""
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    return _retry_after_date(text, now)


def _retry_after_date(text: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


# --- rate limiting ---------------------------------------------------------------------------------------


class Limiter(Protocol):
    def acquire(self) -> float: ...


class SharedLimits:
    """One `TokenBucket` per base URL, shared by the clients of every tenant pointing at that server.

    The SaaS limits each token on its own, but a self-hosted server serving many tenants is one machine:
    `base_url_max_requests_per_second` caps what the whole exporter sends it, and a Retry-After from it
    holds back every tenant of that base URL (`TokenBucket.hold`).
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}

    def bucket(self, tenant: TenantConfig) -> TokenBucket | None:
        """The tenant's base-URL bucket (kept across reloads while its rate and burst stay), or None."""
        rate, burst = tenant.base_url_max_requests_per_second, tenant.base_url_max_requests_burst
        if rate <= 0:
            return None
        with self._lock:
            bucket = self._buckets.get(tenant.base_url)
            if bucket is None or (bucket.rate, bucket.burst) != (rate, burst):
                bucket = self._buckets[tenant.base_url] = TokenBucket(rate, burst, clock=self._clock,
                                                                      sleep=self._sleep)
            return bucket

    def retain(self, base_urls: set[str]) -> None:
        with self._lock:
            self._buckets = {url: b for url, b in self._buckets.items() if url in base_urls}


class TokenBucket:
    """Spaces requests to `rate` a second (bursts up to `burst`): self-hosted servers have no limit.

    Thread-safe: each caller reserves a token under the lock (the count may go negative) and sleeps outside
    it, so concurrent callers queue fairly instead of all waking at once.
    """

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, got {rate}")
        self.rate = float(rate)
        self.burst = float(burst) if burst is not None else max(1.0, self.rate)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._tokens = self.burst
        self._last = clock()
        self._held_until = -math.inf

    def hold(self, seconds: float) -> None:
        """Hold every user of the bucket back for `seconds` (a Retry-After); see `held_for`."""
        with self._lock:
            self._held_until = max(self._held_until, self._clock() + seconds)

    def held_for(self) -> float:
        """Seconds left of a `hold`: callers refuse to send meanwhile rather than sleep through it."""
        return max(0.0, self._held_until - self._clock())

    def acquire(self) -> float:
        """Wait until a request may leave; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + max(0.0, now - self._last) * self.rate)
            self._last = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


# --- retries ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryHooks:
    """What `ExlogareRetry` needs from its client; carried through `Retry.new()`."""

    on_retry: Callable[[str], None]  # the code of an attempt that is about to be retried
    before_retry: Callable[[], None] = lambda: None  # e.g. wait for the rate limiter
    sleep: Callable[[float], None] = time.sleep
    retry_after_cap: float = RETRY_AFTER_CAP
    wall_clock: Callable[[], float] = time.time  # for Retry-After given as an HTTP date
    on_pause: Callable[[float], None] = lambda seconds: None  # a Retry-After this attempt will sleep through


class ExlogareRetry(Retry):
    """urllib3 `Retry` that counts each retried attempt and will not sleep through a long `Retry-After`.

    A `Retry-After` above the cap ends the retries at once; the (429/503) answer then goes back to the
    client, which raises with `retry_after` and holds further requests back until it expires.
    """

    def __init__(self, *args: Any, hooks: RetryHooks | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = hooks

    def new(self, **kw: Any) -> ExlogareRetry:
        kw.setdefault("hooks", self.hooks)
        return super().new(**kw)

    def _retry_after(self, response: Any) -> float | None:
        wall = self.hooks.wall_clock if self.hooks else time.time
        return parse_retry_after(response.headers.get("Retry-After"), wall())

    def increment(self, method: str | None = None, url: str | None = None, response: Any = None,
                  error: Exception | None = None, _pool: Any = None,
                  _stacktrace: Any = None) -> ExlogareRetry:
        if response is not None and error is None and self.respect_retry_after_header:
            cap = self.hooks.retry_after_cap if self.hooks else RETRY_AFTER_CAP
            delay = self._retry_after(response)
            if delay is not None and delay > cap:
                reason = ResponseError(f"Retry-After of {delay:.0f}s is over the {cap:.0f}s cap")
                raise MaxRetryError(_pool, url or "", reason)  # type: ignore[arg-type]
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        if self.hooks is not None and response is not None and response.status in (429, 503):
            pause = self._retry_after(response)
            if pause:  # the client's other threads must not ask while this one waits
                self.hooks.on_pause(pause)
        if self.hooks is not None:  # only reached when another attempt follows; the client reports the last
            self.hooks.on_retry(str(response.status) if error is None and response is not None
                                else transport_code(error))
        return new

    def sleep(self, response: Any = None) -> None:
        delay = None
        if self.respect_retry_after_header and response is not None:
            delay = self._retry_after(response)
        if not delay:
            delay = self.get_backoff_time()
        if delay > 0:
            (self.hooks.sleep if self.hooks else time.sleep)(delay)
        if self.hooks is not None:
            self.hooks.before_retry()


# --- classifying failures --------------------------------------------------------------------------------


def _causes(exc: BaseException | None) -> list[BaseException]:
    """The exception and everything it wraps, outermost first: requests and urllib3 nest the real reason."""
    found: list[BaseException] = []
    queue: list[Any] = [exc]
    while queue and len(found) < 32:
        current = queue.pop(0)
        if not isinstance(current, BaseException) or any(current is seen for seen in found):
            continue
        found.append(current)
        queue.extend(arg for arg in current.args if isinstance(arg, BaseException))
        queue.extend(getattr(current, attr, None) for attr in ("reason", "original_error"))
        queue.extend((current.__cause__, current.__context__))
    return found


def transport_code(exc: BaseException | None) -> str:
    """`timeout` or `connection` for an exception from requests/urllib3."""
    for cause in _causes(exc):
        if isinstance(cause, NewConnectionError):  # a subclass of ConnectTimeoutError, but it is no timeout
            return "connection"
        if isinstance(cause, (requests.Timeout, Urllib3TimeoutError, TimeoutError)):
            return "timeout"
    return "connection"


def _clean(text: str, limit: int = DETAIL_MAX_CHARS) -> str:
    """One short line: upstream text can hold anything, including newlines that would forge log lines."""
    text = _WHITESPACE.sub(" ", _CONTROL.sub(" ", text)).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _body_excerpt(body: bytes, limit: int = 120) -> str:
    text = body[: limit * 16].decode("utf-8", errors="replace")
    if text.lstrip().startswith("<"):
        text = _HTML_TAG.sub(" ", _HTML_NOISE.sub(" ", text))
    return _clean(text, limit)


def _validation_text(items: list[Any]) -> str:
    """FastAPI-style 422 `detail` list → `query.days: Input should be …; …`."""
    parts = []
    for item in items:
        if isinstance(item, dict):
            loc = item.get("loc")
            where = ".".join(str(p) for p in loc) if isinstance(loc, list) else ""
            msg = str(item.get("msg", ""))
            parts.append(f"{where}: {msg}" if where else msg)
        else:
            parts.append(str(item))
    return "; ".join(p for p in parts if p)


def _upstream_detail(body: bytes) -> str | None:
    """The upstream's own `detail`, when the body is the documented JSON error."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    detail = data.get("detail") if isinstance(data, dict) else None
    if isinstance(detail, str):
        return detail
    if isinstance(detail, list):
        return _validation_text(detail) or None
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _read_capped(response: requests.Response, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the (decoded) body, and whether the body ended within them."""
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(chunk_size=_CHUNK_BYTES):
        if size + len(chunk) > limit:
            chunks.append(chunk[: limit - size])
            return b"".join(chunks), False
        size += len(chunk)
        chunks.append(chunk)
    return b"".join(chunks), True


def _prepared_url(url: str, params: tuple[tuple[str, Any], ...]) -> str:
    """The URL with its query, as requests prepares it (quoting, IDNA, `None` values left out)."""
    try:
        return _prepared_url_cached(url, params)
    except TypeError:  # an unhashable parameter value
        return _prepare_url(url, params)


def _prepare_url(url: str, params: tuple[tuple[str, Any], ...]) -> str:
    request = requests.PreparedRequest()
    request.prepare_url(url, list(params))
    return str(request.url)


# The stats calls of every tenant of a server ask for the same few URLs each interval; preparing one costs
# as much CPU as parsing the answer.
_prepared_url_cached = functools.lru_cache(maxsize=1024)(_prepare_url)


class _BearerAuth(AuthBase):
    """Puts the token on each request as it is sent; nothing else in the client touches its value."""

    def __init__(self, token: Secret) -> None:
        self._token = token

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Authorization"] = f"Bearer {self._token.reveal()}"
        return request

    def redact(self, text: str) -> str:
        """Upstream text (an echoing proxy's error page) must not carry the token into our messages.

        A cut-off copy (a short excerpt ending in `…`) is caught too: anything that starts like the token.
        """
        value = self._token.reveal()
        if not value:
            return text
        return re.sub(re.escape(value[:_REDACT_PREFIX_CHARS]) + r"\S*", "***", text.replace(value, "***"))

    def __repr__(self) -> str:
        return "_BearerAuth(***)"


# --- the client ------------------------------------------------------------------------------------------


class ExlogareClient:
    """One tenant's connection to the Read API; safe to share between threads."""

    def __init__(self, tenant: TenantConfig, on_response: Callable[[str, str], None] | None = None,
                 limiter: Limiter | None = None, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep, shared: TokenBucket | None = None,
                 pools: PoolManager | None = None) -> None:
        """`limiter` replaces the tenant's own bucket (`max_requests_per_second`); `shared` is the bucket of
        its base URL (`SharedLimits`), taken after it and held back on a Retry-After like the tenant; `pools`
        (`deadline.pool_manager`) are connections shared with the other tenants' clients, else it has its own.
        """
        self._name: str = tenant.name
        self._base = tenant.base_url.rstrip("/") + API_PREFIX
        self._timeout = (tenant.connect_timeout, tenant.timeout)
        self._max_bytes: int = tenant.max_response_bytes
        # connect + read timeout, from request to last byte: a trickling upstream cannot hold a refresh longer
        self._attempt_budget = tenant.connect_timeout + tenant.timeout
        self._on_response = on_response
        self._clock = clock
        if limiter is None and tenant.max_requests_per_second > 0:
            limiter = TokenBucket(tenant.max_requests_per_second, tenant.max_requests_burst, clock=clock,
                                  sleep=sleep)
        self._limiter = limiter
        self._shared = shared
        self._sleep = sleep
        self._auth = _BearerAuth(tenant.token)
        self._local = threading.local()  # the endpoint label of the call in flight, for retried attempts
        self._block_lock = threading.Lock()
        self._blocked_until: float | None = None
        retry = ExlogareRetry(
            total=tenant.retries, connect=None, read=None, status=None, other=0, redirect=False,
            allowed_methods=frozenset({"GET"}), status_forcelist=RETRY_STATUSES,
            backoff_factor=BACKOFF_FACTOR, backoff_jitter=BACKOFF_JITTER, backoff_max=BACKOFF_MAX,
            raise_on_status=False, respect_retry_after_header=True,
            hooks=RetryHooks(on_retry=self._on_retry, before_retry=self._pace, sleep=sleep,
                             on_pause=self._block_for),
        )
        self._session = requests.Session()
        self._session.headers.update({"User-Agent": USER_AGENT, "Accept": "application/json"})
        self._adapter = DeadlineAdapter(max_retries=retry, pools=pools)
        self._session.mount("http://", self._adapter)
        self._session.mount("https://", self._adapter)
        # What `Session.request` would work out for every request, once: the proxies and CA bundle the
        # environment names (HTTPS_PROXY, NO_PROXY, REQUESTS_CA_BUNDLE...) for this base URL and the headers.
        # Per request, that costs more CPU than the rest of the call; requests go straight to the adapter.
        verify: str | bool = str(tenant.ca_file) if tenant.ca_file else True
        settings = self._session.merge_environment_settings(self._base + "/", {}, True, verify, None)
        self._proxies: dict[str, str] = settings["proxies"]
        self._verify: str | bool = settings["verify"]
        self._headers = dict(self._session.headers)

    def __repr__(self) -> str:
        return f"ExlogareClient(tenant={self._name!r})"

    def close(self) -> None:
        self._session.close()

    def get(self, endpoint: str, params: dict[str, Any], parse: Callable[[Any], T]) -> T:
        """GET `/api/v1<endpoint>` and return `parse(json)`; every failure is an `UpstreamError`."""
        label = endpoint_label(endpoint)
        self._raise_if_blocked(endpoint)
        if self._limiter is not None or self._shared is not None:
            self._pace()
            self._raise_if_blocked(endpoint)
        self._local.label = label
        deadline.begin(self._attempt_budget)
        try:
            response, body, complete = self._fetch(endpoint, params, label)
        finally:
            deadline.end()
        status = response.status_code
        ok = 200 <= status < 300
        if 300 <= status < 400:
            raise self._failed(label, self._redirect_error(endpoint, response))
        if not ok:
            raise self._failed(label, self._status_error(endpoint, response, body))
        if not complete:
            raise self._failed(label, self._invalid(endpoint, status,
                                                    f"response larger than {self._max_bytes} bytes"))
        try:
            data = json.loads(body, parse_constant=_refuse_constant)
        except ValueError as exc:  # includes UnicodeDecodeError
            raise self._failed(label, self._not_json(endpoint, response, body, exc)) from None
        try:
            value = parse(data)
        except ShapeError as exc:
            raise self._failed(label, self._invalid(endpoint, status, f"unexpected shape: {exc}")) from None
        self._report(label, str(status))
        return value

    # --- helpers for get() ---

    def _fetch(self, endpoint: str, params: dict[str, Any],
               label: str) -> tuple[requests.Response, bytes, bool]:
        """Send the request and read the (capped) body; each attempt within its `deadline` budget."""
        try:
            response = self._adapter.send(self._prepare(endpoint, params), stream=True, timeout=self._timeout,
                                          verify=self._verify, proxies=self._proxies)
        except requests.RequestException as exc:
            raise self._failed(label, self._transport_error(endpoint, exc)) from None
        with response:
            try:
                body, complete = self._read_body(response, 200 <= response.status_code < 300)
            except requests.exceptions.ContentDecodingError:
                if deadline.expired():
                    raise self._failed(label, self._transport_error(endpoint, None)) from None
                error = self._invalid(endpoint, response.status_code, "the body could not be decompressed")
                raise self._failed(label, error) from None
            except requests.RequestException as exc:
                raise self._failed(label, self._transport_error(endpoint, exc)) from None
        if deadline.expired():  # a body without Content-Length just ends when the socket is shut
            raise self._failed(label, self._transport_error(endpoint, None))
        return response, body, complete

    def _prepare(self, endpoint: str, params: dict[str, Any]) -> requests.PreparedRequest:
        """The request `Session.get` would send, without its per-request merging: no cookies (a token API
        sets none), never a redirect followed (the adapter does not follow them; 3xx is an error here)."""
        request = requests.PreparedRequest()
        request.method = "GET"
        request.url = _prepared_url(self._base + endpoint, tuple(params.items()))
        request.headers = CaseInsensitiveDict(self._headers)
        request.body = None
        request.prepare_auth(self._auth)
        return request

    def _report(self, label: str, code: str) -> None:
        if self._on_response is not None:
            self._on_response(label, code)

    def _failed(self, label: str, error: UpstreamError) -> UpstreamError:
        """Count the final attempt under the error's code and hand the error back for raising."""
        self._report(label, error.code)
        log.debug("%s", error)
        return error

    def _on_retry(self, code: str) -> None:
        label = getattr(self._local, "label", "unknown")
        log.debug("tenant %s: %s: attempt answered %s; retrying", self._name, label, code)
        self._report(label, code)

    def _wait_for_limiter(self) -> None:
        if self._limiter is not None:
            self._limiter.acquire()
        if self._shared is not None:
            self._shared.acquire()

    def _pace(self) -> None:
        """Wait for the limiters. A short pause of the shared base URL (another tenant's Retry-After, which
        that tenant's retry sleeps through) is waited out, and the token taken before it is void: queue
        again, or every waiting thread would send at once when it ends."""
        self._wait_for_limiter()
        while self._shared is not None and 0 < (pause := self._shared.held_for()) <= RETRY_AFTER_CAP:
            self._sleep(pause)
            self._wait_for_limiter()

    def _raise_if_blocked(self, endpoint: str) -> None:
        """Refuse to send while the upstream's pause lasts (a long pause, for a shared base URL)."""
        with self._block_lock:
            until = self._blocked_until
        remaining = 0.0 if until is None else until - self._clock()
        shared = self._shared.held_for() if self._shared is not None else 0.0
        if remaining > 0 or shared > RETRY_AFTER_CAP:
            whose = "" if remaining >= shared else " for every tenant of this base_url"
            raise RateLimited(self._name, endpoint, "429",
                              f"the upstream asked for a pause (Retry-After){whose}; not asking again for "
                              f"another {max(remaining, shared):.0f}s", retry_after=max(remaining, shared))

    def _block_for(self, seconds: float) -> None:
        seconds = min(seconds, BLOCK_MAX)
        until = self._clock() + seconds
        with self._block_lock:
            if self._blocked_until is None or until > self._blocked_until:
                self._blocked_until = until
        if self._shared is not None:
            self._shared.hold(seconds)
        log.info("tenant %s: upstream asked to wait %.0fs (Retry-After); holding requests back",
                 self._name, seconds, extra={"tenant": self._name})

    def _read_body(self, response: requests.Response, ok: bool) -> tuple[bytes, bool]:
        declared = response.headers.get("Content-Length", "")
        if ok and declared.isdigit() and int(declared) > self._max_bytes:
            return b"", False  # no need to read what we would refuse anyway
        return _read_capped(response, self._max_bytes if ok else min(self._max_bytes, ERROR_BODY_BYTES))

    def _detail(self, text: str) -> str:
        return _clean(self._auth.redact(text))

    def _invalid(self, endpoint: str, status: int | None, detail: str) -> InvalidBody:
        return InvalidBody(self._name, endpoint, "invalid_body", self._detail(detail), status=status)

    def _not_json(self, endpoint: str, response: requests.Response, body: bytes,
                  exc: ValueError) -> InvalidBody:
        excerpt = self._detail(_body_excerpt(body))
        if not body.strip():
            return self._invalid(endpoint, response.status_code, "empty body, expected JSON")
        kind = "an HTML page" if "html" in response.headers.get("Content-Type", "").lower() \
            or body.lstrip()[:1] == b"<" else "not valid JSON"
        reason = "" if kind == "an HTML page" else f" ({_clean(str(exc), 80)})"
        return self._invalid(endpoint, response.status_code, f"{kind}{reason}, expected JSON: {excerpt!r}")

    def _transport_error(self, endpoint: str, exc: requests.RequestException | None) -> TransportError:
        if exc is None or deadline.expired():
            return TransportError(self._name, endpoint, "timeout",
                                  f"the answer did not complete within {self._attempt_budget:g}s")
        code = transport_code(exc)
        causes = _causes(exc)
        if code == "timeout":
            connect = any(isinstance(c, (requests.ConnectTimeout, ConnectTimeoutError)) for c in causes)
            detail = (f"no connection within {self._timeout[0]:g}s" if connect
                      else f"no answer within {self._timeout[1]:g}s")
        else:
            innermost = causes[-1]
            detail = str(innermost) or type(innermost).__name__
        return TransportError(self._name, endpoint, code, self._detail(detail))

    def _redirect_error(self, endpoint: str, response: requests.Response) -> InvalidBody:
        location = self._detail(response.headers.get("Location", "(no Location header)"))
        detail = f"the base_url redirects to {location}; set base_url to the final address"
        cut = location.find(API_PREFIX + "/")
        if cut > 0:
            detail += f" ({location[:cut]})"
        status = response.status_code
        return InvalidBody(self._name, endpoint, str(status), detail, status=status)

    def _status_error(self, endpoint: str, response: requests.Response, body: bytes) -> UpstreamError:
        status = response.status_code
        upstream = _upstream_detail(body)
        detail = self._detail(upstream or _body_excerpt(body) or response.reason or "no detail")
        retry_after = parse_retry_after(response.headers.get("Retry-After"), time.time())
        hint = ""
        cls: type[UpstreamError]
        if status == 401:
            cls = AuthError
            if upstream == "Invalid or revoked API token":
                hint = "the token is unknown or revoked: create a new read token for this tenant"
            elif upstream == "Missing token":
                hint = "no token reached the server: check the token and any proxy that strips Authorization"
            elif upstream is not None:
                hint = "read tokens start with exl_; this one was not taken for an API token"
        elif status == 403:
            cls = AuthError
            match = _SCOPE.search(upstream or "")
            scope = match.group(1) if match else "read"
            hint = f"the token lacks the {scope!r} scope: give the exporter a token with the read scope"
        elif status == 429:
            cls = RateLimited
        elif 400 <= status < 500:
            cls = BadRequest
        elif status >= 500:
            cls = ServerError
        else:
            cls = UpstreamError
        if retry_after is not None and status in (429, 503):
            self._block_for(retry_after)
        return cls(self._name, endpoint, str(status), detail, status=status, retry_after=retry_after,
                   hint=hint)
