"""A read-only, caching proxy of the Exlogare Read API v1 for Grafana, mounted under `/proxy/`.

Grafana (the Infinity datasource) reads `/proxy/<tenant>/api/v1/<endpoint>` with a token of its own; the
proxy checks that token and the request the way the upstream would, then answers from a shared cache or
through the tenant's `ExlogareClient` (the poller's: one rate limit, one Retry-After hold-back, one request
counter). Nothing but the six documented GET endpoints can reach the upstream, and the upstream token
never leaves the exporter. `/proxy/<tenant>/analyses.json` walks the pages itself for panels that cannot.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .apirules import (
    ANALYSES_LIMIT,
    INT_PARAMS,
    PAGE_LIMIT,
    ApiError,
    IntParam,
    Query,
    check_analyses_filters,
    iso,
    json_bytes,
    parse_uuid,
)
from .cache import MISS, Cache, CacheStats
from .client import (
    AuthError,
    BadRequest,
    ExlogareClient,
    RateLimited,
    ServerError,
    TransportError,
    UpstreamError,
    endpoint_label,
)
from .config import Config, ProxyClient, ProxyConfig, TenantConfig
from .parse import ShapeError
from .web import SECURITY_HEADERS

log = logging.getLogger(__name__)

StartResponse = Callable[..., Any]

PREFIX = "/proxy/"
OTHER = "(other)"  # the label value for an unconfigured tenant or an unknown path: labels stay bounded
TENANTS_LABEL = "tenants"
WALK_LABEL = "analyses_json"
MAX_PATH_CHARS = 512
MAX_QUERY_CHARS = 2048
MAX_QUERY_FIELDS = 32
DEFAULT_MAX_ITEMS = 1000
DEFAULT_RETRY_AFTER = 30  # seconds, when a 429 did not say
ENTRY_OVERHEAD_BYTES = 256  # key, headers and bookkeeping of one cache entry, roughly
ALL = ("", "*")  # analyses.json filter values meaning "no filter" (Grafana's All)
REALM = "exlogare-proxy"

_PATH_CHARS = re.compile(r"[A-Za-z0-9._~/-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RELATIVE = re.compile(r"now(?:-(\d{1,9})([smhdw]))?")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


# --- routes ----------------------------------------------------------------------------------------------


def _shape(kind: type) -> Callable[[Any], Any]:
    """A light check of an answer's JSON type: the proxy passes bodies on, it does not parse them."""
    def check(data: Any) -> Any:
        if not isinstance(data, kind):
            raise ShapeError(f"expected a JSON {'object' if kind is dict else 'array'}, got "
                             f"{type(data).__name__}")
        return data
    return check


def check_page(data: Any) -> dict[str, Any]:
    """A page of /analyses: an object with a list of objects in `items` and a `next_cursor`."""
    page = _shape(dict)(data)
    items, cursor = page.get("items"), page.get("next_cursor")
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ShapeError("expected a page of analyses: `items` is not a list of objects")
    if cursor is not None and not isinstance(cursor, str):
        raise ShapeError("expected a page of analyses: `next_cursor` is neither a string nor null")
    return page


@dataclass(frozen=True)
class Endpoint:
    """A read endpoint: its path below /api/v1, its integer parameters, and the check of its answer."""

    path: str
    ints: tuple[IntParam, ...]
    check: Callable[[Any], Any]


def _endpoint(path: str, check: Callable[[Any], Any]) -> Endpoint:
    """A list or stats endpoint, with the server's integer parameters."""
    return Endpoint(path, INT_PARAMS[path], check)


ANALYSES = _endpoint("/analyses", check_page)
ANALYSIS = Endpoint("/analyses/{id}", (), _shape(dict))
# The six read endpoints, by path below /api/v1 ("/analyses/{id}" stands for every id).
ENDPOINTS: dict[str, Endpoint] = {e.path: e for e in (
    ANALYSES, ANALYSIS,
    _endpoint("/stats/overview", _shape(dict)),
    _endpoint("/stats/timeseries", _shape(list)),
    _endpoint("/stats/top-projects", _shape(list)),
    _endpoint("/stats/top-root-causes", _shape(list)),
)}


def endpoint_of(api_path: str) -> Endpoint:
    """The endpoint of a path below /api/v1 that `route_of` accepted."""
    return ANALYSIS if api_path.startswith("/analyses/") else ENDPOINTS[api_path]


@dataclass(frozen=True)
class Route:
    """What a path asks for: `kind` is `tenants`, `walk`, `api` or `unknown`."""

    kind: str
    tenant: str | None = None
    api_path: str = ""  # below /api/v1, for `api` (an analysis id as given)

    @property
    def label(self) -> str:
        if self.kind == "tenants":
            return TENANTS_LABEL
        if self.kind == "walk":
            return WALK_LABEL
        if self.kind == "api":
            return endpoint_label(self.api_path)
        return OTHER


def route_of(segments: list[str]) -> Route:
    """The route of the path segments after /proxy/ (already checked for dot and empty segments)."""
    if segments == ["tenants.json"]:
        return Route("tenants")
    tenant, rest = segments[0], segments[1:]
    if rest == ["analyses.json"]:
        return Route("walk", tenant)
    if rest[:2] == ["api", "v1"]:
        below = "/" + "/".join(rest[2:])
        if below in ENDPOINTS and below != ANALYSIS.path:
            return Route("api", tenant, below)
        if len(rest) == 4 and rest[2] == "analyses":
            return Route("api", tenant, below)
    return Route("unknown", tenant)


# --- answers ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """A JSON response; answers that came from the upstream (200s and 4xx verdicts) are cached."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def detail(cls, status: int, detail: Any, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
        return cls(status, json_bytes({"detail": detail}), headers)

    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + ENTRY_OVERHEAD_BYTES


class Refused(Exception):  # noqa: N818 - an answer, not a failure
    """An answer given without asking the upstream: a refusal or a validation error."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.status)
        self.answer = answer

    @classmethod
    def detail(cls, status: int, detail: Any, headers: tuple[tuple[str, str], ...] = ()) -> Refused:
        return cls(Answer.detail(status, detail, headers))


def error_answer(exc: UpstreamError) -> Answer:
    """An upstream failure as Grafana should see it: never a 401 (that would read as its own token)."""
    where = f"tenant {exc.tenant}: {exc.endpoint}"
    hint = f" ({exc.hint})" if exc.hint else ""
    if isinstance(exc, AuthError):
        return Answer.detail(502, f"tenant {exc.tenant}: the Exlogare API refused the exporter's token: "
                                  f"{exc.status} {exc.detail}{hint}")
    if isinstance(exc, RateLimited):
        wait = max(1, math.ceil(exc.retry_after)) if exc.retry_after else DEFAULT_RETRY_AFTER
        return Answer.detail(503, f"{where}: the Exlogare API is rate-limiting the exporter; retry in "
                                  f"{wait}s", (("Retry-After", str(wait)),))
    if isinstance(exc, BadRequest):
        return Answer.detail(exc.status or 400, exc.detail)
    status = 504 if isinstance(exc, TransportError) and exc.code == "timeout" else 502
    return Answer.detail(status, f"{where}: the Exlogare API failed: {exc.code}: {exc.detail}{hint}")


def may_serve_stale(exc: BaseException) -> bool:
    """429, 5xx and an unreachable upstream: the trouble is theirs, so a recent answer beats none."""
    return isinstance(exc, (RateLimited, ServerError, TransportError))


# --- request checks (pure) -------------------------------------------------------------------------------


def split_target(environ: Mapping[str, Any]) -> tuple[str, str]:
    """The raw (still percent-encoded) path and query, as the client sent them."""
    raw = environ.get("REQUEST_URI")
    if not raw:  # another WSGI server: PATH_INFO is decoded, so encoded tricks show up decoded
        return environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")
    if not raw.startswith("/"):  # absolute form, http://host/path
        parts = urlsplit(raw)
        return parts.path, parts.query
    path, _, query = raw.partition("?")
    return path, query


def path_segments(path: str) -> list[str]:
    """The segments after /proxy/, or `Refused` for anything that smells of traversal or encoding."""
    if len(path) > MAX_PATH_CHARS:
        raise Refused.detail(414, f"the path is longer than {MAX_PATH_CHARS} characters")
    if not _PATH_CHARS.fullmatch(path):
        raise Refused.detail(400, "a proxy path may only hold letters, digits and - . _ ~ / "
                                  "(no percent-encoding, spaces or control characters)")
    if not path.startswith(PREFIX):
        raise Refused.detail(404, "Not Found")
    segments = path[len(PREFIX):].split("/")
    if any(not s for s in segments):
        raise Refused.detail(400, "empty path segments (//) are not allowed")
    if any(s in (".", "..") for s in segments):
        raise Refused.detail(400, "dot segments (. and ..) are not allowed")
    return segments


def parse_query(raw: str) -> dict[str, str]:
    """Decoded query parameters, the last of a repeated one winning (as on the server)."""
    if len(raw) > MAX_QUERY_CHARS:
        raise Refused.detail(414, f"the query string is longer than {MAX_QUERY_CHARS} characters")
    if not (raw.isascii() and raw.isprintable()):
        raise Refused.detail(400, "the query string must be printable ASCII (percent-encode the rest)")
    try:
        pairs = parse_qsl(raw, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS)
    except (ValueError, UnicodeDecodeError):
        raise Refused.detail(400, f"the query string is malformed, not UTF-8 or has more than "
                                  f"{MAX_QUERY_FIELDS} parameters") from None
    if any(_CONTROL.search(k) or _CONTROL.search(v) for k, v in pairs):
        raise Refused.detail(400, "control characters (such as CR or LF) are not allowed in query parameters")
    return dict(pairs)


def _api_error(exc: ApiError) -> Refused:
    return Refused(Answer(exc.status, json_bytes(exc.body)))


def api_params(api_path: str, query: Mapping[str, str]) -> tuple[str, dict[str, Any]]:
    """The endpoint path and the canonical parameters to forward, or `Refused` with the server's answer.

    Only documented parameters survive (the server ignores the rest); defaults are filled in and values
    put in one spelling, so equivalent queries share a cache entry.
    """
    endpoint = endpoint_of(api_path)
    try:
        if endpoint is ANALYSIS:
            return "/analyses/" + parse_uuid(api_path.rsplit("/", 1)[1]), {}
        if endpoint is ANALYSES:
            return api_path, _analyses_params(query)
        q = Query(query)
        params = {p.name: p.read(q) for p in endpoint.ints}
        q.check()
        return api_path, params
    except ApiError as exc:
        raise _api_error(exc) from None


def _analyses_params(query: Mapping[str, str]) -> dict[str, Any]:
    q = Query(query)
    since, until = q.datetime_us("since"), q.datetime_us("until")
    params: dict[str, Any] = {ANALYSES_LIMIT.name: ANALYSES_LIMIT.read(q)}
    q.check()
    check_analyses_filters(since, until, query.get("severity"))  # ApiError: api_params turns it into Refused
    params.update(_iso_bounds(since, until))
    params.update({k: query[k] for k in ("severity", "project", "source", "cursor") if k in query})
    return params


def _iso_bounds(since: int | None, until: int | None) -> dict[str, str]:
    """Absolute bounds in the server's own spelling, so equal instants make equal cache keys."""
    return {name: iso(us) for name, us in (("since", since), ("until", until)) if us is not None}


@dataclass(frozen=True)
class WalkQuery:
    """A validated analyses.json request. `since`/`until` are as given when relative (`now-7d`), so one
    cache entry serves every viewer, and resolved against the clock only when the pages are fetched."""

    max_items: int
    params: tuple[tuple[str, str], ...]  # severity, project, source; absolute since/until in ISO form
    relative: tuple[tuple[str, int], ...] = ()  # (since|until, seconds before now)

    def upstream_params(self, now: float) -> dict[str, str]:
        params = dict(self.params)
        for name, seconds in self.relative:
            params[name] = iso(round((now - seconds) * 1e6))
        return params


def walk_query(query: Mapping[str, str], cap: int, now: float) -> WalkQuery:
    """analyses.json's parameters: /analyses' filters (with `*` or empty as All) and `max_items`."""
    relative: dict[str, int] = {}
    absolute = dict(query)
    for name in ("since", "until"):
        match = _RELATIVE.fullmatch(query.get(name, "").strip())
        if match:
            relative[name] = int(match[1] or 0) * _UNITS[match[2] or "s"]
            del absolute[name]
    q = Query(absolute)
    since, until = q.datetime_us("since"), q.datetime_us("until")
    max_items = q.integer("max_items", min(DEFAULT_MAX_ITEMS, cap), 1, cap)
    try:
        q.check()
    except ApiError as exc:
        raise _api_error(exc) from None
    filters = {k: query[k] for k in ("severity", "project", "source") if query.get(k) not in (None, *ALL)}
    now_us = round(now * 1e6)
    bounds = {"since": since, "until": until} | {k: now_us - s * 1_000_000 for k, s in relative.items()}
    try:
        check_analyses_filters(bounds["since"], bounds["until"], filters.get("severity"))
    except ApiError as exc:
        raise _api_error(exc) from None
    params = {**filters, **_iso_bounds(since, until)}
    return WalkQuery(max_items, tuple(sorted(params.items())), tuple(sorted(relative.items())))


# --- metrics ---------------------------------------------------------------------------------------------


class _Tracked:
    """A labelled counter that remembers its label sets, so a removed tenant's series can go with it."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self._seen: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()

    def inc(self, *labels: str) -> None:
        with self._lock:
            self._seen.add(labels)
        self.counter.labels(*labels).inc()

    def forget(self, keep: Callable[[str], bool]) -> None:
        with self._lock:
            gone = [labels for labels in self._seen if not keep(labels[0])]
            self._seen.difference_update(gone)
        for labels in gone:
            self.counter.remove(*labels)


class _CacheCollector:
    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        stats = self._stats()
        yield GaugeMetricFamily("exlogare_proxy_cache_entries", "Answers held in the proxy's cache.",
                                value=stats.entries)
        yield GaugeMetricFamily("exlogare_proxy_cache_bytes", "Approximate size of the proxy's cache.",
                                value=stats.bytes)
        yield CounterMetricFamily("exlogare_proxy_cache_evictions",
                                  "Answers dropped from the proxy's cache to stay within cache_max_entries "
                                  "and cache_max_bytes.", value=stats.evictions)


class ProxyMetrics:
    """The proxy's own series, on the exporter's registry. Label values are bounded: see `OTHER`."""

    def __init__(self, registry: CollectorRegistry, cache_stats: Callable[[], CacheStats]) -> None:
        self.requests = _Tracked(Counter(
            "exlogare_proxy_requests", "Requests to the Grafana proxy, by tenant, endpoint and the HTTP "
            "status answered. (other) stands for an unconfigured tenant or an unknown path.",
            ["tenant", "endpoint", "code"], registry=registry))
        self.cache = _Tracked(Counter(
            "exlogare_proxy_cache_results", "Proxy answers by how the cache found them: hit (fresh), miss "
            "(fetched), shared (fetched once for concurrent identical requests), stale (served during "
            "upstream trouble).", ["tenant", "endpoint", "result"], registry=registry))
        self.upstream = _Tracked(Counter(
            "exlogare_proxy_upstream_requests", "HTTP requests the proxy made to the Exlogare API, retries "
            "included (a share of exlogare_upstream_requests_total).", ["tenant", "endpoint", "code"],
            registry=registry))
        self.duration = Histogram(
            "exlogare_proxy_request_duration_seconds", "Time to answer a proxy request.", ["endpoint"],
            registry=registry)
        registry.register(_CacheCollector(cache_stats))

    def forget_tenants(self, keep: Callable[[str], bool]) -> None:
        for tracked in (self.requests, self.cache, self.upstream):
            tracked.forget(keep)


# --- the proxy -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _State:
    """One config's view, swapped whole on reload."""

    settings: ProxyConfig = field(default_factory=ProxyConfig)
    tenants: Mapping[str, TenantConfig] = field(default_factory=dict)
    clients: tuple[tuple[bytes, ProxyClient], ...] = ()  # (sha256 of the token, client)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("latin-1", "replace")).digest()


CacheKey = tuple[str, str, tuple[tuple[str, Any], ...]]  # (tenant, endpoint, canonical query)


class Proxy:
    """The WSGI app behind `/proxy/`; `apply()` adopts a (re)loaded config."""

    def __init__(self, clients: Callable[[str], ExlogareClient | None],
                 registry: CollectorRegistry | None = None, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self._clients = clients
        self._wall = wall_clock
        self._state = _State()
        defaults = ProxyConfig()
        self.cache: Cache[CacheKey, Answer] = Cache(
            defaults.cache_ttl, defaults.cache_stale_ttl, defaults.cache_max_entries,
            defaults.cache_max_bytes, size=Answer.size, clock=clock)
        self._local = threading.local()  # marks the threads fetching for the proxy, for metrics
        self.metrics = ProxyMetrics(registry, self.cache.stats) if registry is not None else None

    # --- configuration ---

    def apply(self, config: Config) -> None:
        """Adopt new settings and clients; forget cached answers of tenants that changed or went away."""
        old = self._state
        settings = config.proxy
        tenants = {t.name: t for t in config.tenants}
        self.cache.configure(settings.cache_ttl, settings.cache_stale_ttl, settings.cache_max_entries,
                             settings.cache_max_bytes)
        digests = tuple((_digest(c.token.reveal()), c) for c in settings.clients)
        self._state = _State(settings, tenants, digests)
        changed = {name for name, cfg in old.tenants.items() if tenants.get(name) != cfg}
        if changed:
            self.cache.discard(lambda key: key[0] in changed)
        if self.metrics is not None:
            self.metrics.forget_tenants(lambda name: name in tenants or name == OTHER)

    def on_upstream_response(self, tenant: str, endpoint: str, code: str) -> None:
        """A listener on every upstream attempt; counts those made on the proxy's behalf."""
        if self.metrics is not None and getattr(self._local, "fetching", False):
            self.metrics.upstream.inc(tenant, endpoint, code)

    # --- WSGI ---

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        started = time.monotonic()
        state = self._state
        request = _Request()
        try:
            answer = self._handle(environ, state, request)
        except Refused as refused:
            answer = refused.answer
        except Exception:
            log.exception("proxy: internal error")
            answer = Answer.detail(500, "internal error in the exporter's proxy; see its log")
        if self.metrics is not None:
            self.metrics.requests.inc(request.tenant, request.endpoint, str(answer.status))
            if request.result is not None:
                self.metrics.cache.inc(request.tenant, request.endpoint, request.result)
            self.metrics.duration.labels(request.endpoint).observe(time.monotonic() - started)
        log.debug("proxy: %s %s %s: %d %s", request.client or "-", request.tenant, request.endpoint,
                  answer.status, request.result or "")
        return _send(start_response, answer, request)

    def _handle(self, environ: Mapping[str, Any], state: _State, request: _Request) -> Answer:
        path, raw_query = split_target(environ)
        segments = path_segments(path)
        route = route_of(segments)
        request.endpoint = route.label
        if route.tenant in state.tenants:
            request.tenant = route.tenant
        if environ.get("REQUEST_METHOD") != "GET":
            raise Refused.detail(405, "Method Not Allowed: the proxy is read-only", (("Allow", "GET"),))
        if not state.settings.enabled:
            raise Refused.detail(404, "the proxy is not enabled (proxy.enabled in the exporter's config)")
        client = self._authenticate(state, environ.get("HTTP_AUTHORIZATION"))
        request.client = client.name
        if route.kind == "tenants":
            return Answer(200, json_bytes([{"name": n} for n in client.tenants if n in state.tenants]))
        upstream = self._clients(route.tenant or "") if route.tenant in client.tenants else None
        if upstream is None or route.tenant not in state.tenants:
            # The same answer whether the tenant exists or not: a client learns nothing of the others.
            raise Refused.detail(404, "no such tenant for this client")
        if route.kind == "unknown":
            raise Refused.detail(404, "Not Found")
        query = parse_query(raw_query)
        tenant = route.tenant
        assert tenant is not None
        if route.kind == "walk":
            walk = walk_query(query, state.settings.max_items, self._wall())
            canonical = (("max_items", walk.max_items), *walk.params, *walk.relative)
            key: CacheKey = (tenant, WALK_LABEL, canonical)
            return self._cached(request, key, lambda: self._walk(upstream, walk))
        api_path, params = api_params(route.api_path, query)
        check = endpoint_of(api_path).check
        key = (tenant, api_path, tuple(sorted(params.items())))
        return self._cached(request, key, lambda: self._fetch(upstream, api_path, params, check))

    def _authenticate(self, state: _State, header: str | None) -> ProxyClient:
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused.detail(401, "a bearer token is required: Authorization: Bearer <client token>",
                                 (("WWW-Authenticate", f'Bearer realm="{REALM}"'),))
        presented = _digest(token.strip())
        found = None
        for digest, client in state.clients:  # every one, in constant time: no early exit to time
            if hmac.compare_digest(digest, presented) and found is None:
                found = client
        if found is None:
            raise Refused.detail(401, "the token is not one of the proxy's clients",
                                 (("WWW-Authenticate", f'Bearer realm="{REALM}", error="invalid_token"'),))
        return found

    def _cached(self, request: _Request, key: CacheKey, load: Callable[[], Answer]) -> Answer:
        try:
            found = self.cache.get(key, load, may_serve_stale)
        except UpstreamError as exc:
            request.result = MISS
            return error_answer(exc)
        request.result = found.result
        request.age = found.age
        if isinstance(found.error, UpstreamError):
            request.stale_reason = found.error.code
        return found.value

    def _get(self, client: ExlogareClient, path: str, params: dict[str, Any],
             check: Callable[[Any], Any]) -> Any:
        """One upstream call, marked as the proxy's for the metrics."""
        self._local.fetching = True
        try:
            return client.get(path, params, check)
        finally:
            self._local.fetching = False

    def _fetch(self, client: ExlogareClient, path: str, params: dict[str, Any],
               check: Callable[[Any], Any]) -> Answer:
        try:
            data = self._get(client, path, params, check)
        except BadRequest as exc:  # the upstream's verdict on this query: as cacheable as a 200
            return error_answer(exc)
        return Answer(200, json_bytes(data))

    def _walk(self, client: ExlogareClient, walk: WalkQuery) -> Answer:
        """Every page of /analyses (up to max_items) as one flat array, de-duplicated by id."""
        params: dict[str, Any] = walk.upstream_params(self._wall())
        items: list[Any] = []
        seen: set[Any] = set()
        cursor = None
        while len(items) < walk.max_items:
            page_params = {**params, "limit": min(PAGE_LIMIT, walk.max_items - len(items))}
            if cursor is not None:
                page_params["cursor"] = cursor
            try:
                page = self._get(client, ANALYSES.path, page_params, check_page)
            except BadRequest as exc:
                return error_answer(exc)
            fresh = [item for item in page["items"] if item.get("id") not in seen]
            seen.update(item.get("id") for item in fresh)
            items.extend(fresh)
            cursor = page.get("next_cursor")
            if not cursor or not fresh:
                break
        truncated = "true" if cursor and len(items) >= walk.max_items else "false"
        return Answer(200, json_bytes(items[: walk.max_items]), (("X-Exlogare-Truncated", truncated),))


@dataclass
class _Request:
    """What one request turned out to be, for its headers, metrics and log line."""

    tenant: str = OTHER
    endpoint: str = OTHER
    client: str | None = None
    result: str | None = None
    age: float = 0.0
    stale_reason: str = ""


def _send(start_response: StartResponse, answer: Answer, request: _Request) -> list[bytes]:
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(answer.body))),
               *answer.headers]
    if request.result is not None:
        headers.append(("X-Exlogare-Cache", request.result))
        if request.result != MISS:
            headers.append(("Age", str(int(request.age))))
        if request.stale_reason:
            headers.append(("X-Exlogare-Stale-Reason", request.stale_reason))
    try:
        phrase = HTTPStatus(answer.status).phrase
    except ValueError:  # an unusual 4xx passed on from the upstream
        phrase = "Unknown"
    start_response(f"{answer.status} {phrase}", [*headers, *SECURITY_HEADERS])
    return [answer.body]

__all__ = ["OTHER", "Answer", "Proxy", "ProxyMetrics", "Refused", "route_of"]
