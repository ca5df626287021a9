"""The Simulator: tenants, tokens, clock, faults and the read API's answers, behind one lock.

`handle()` turns one HTTP request into a `Reply` without doing any I/O, so the WSGI layer stays thin
and the Python API (`stats()`) answers exactly what the server would.
"""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..apirules import (
    ANALYSES_LIMIT,
    INT_PARAMS,
    SEVERITIES,
    US_PER_DAY,
    US_PER_SECOND,
    ApiError,
    Query,
    check_analyses_filters,
    decode_cursor,
    encode_cursor,
    from_us,
    json_bytes,
    parse_uuid,
    to_us,
)
from . import data
from .data import Failure, Rca
from .store import TenantStore

API_PREFIX = "/api/v1"
LOG_LIMIT = 100_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_UNSET: Any = ...

# path below /api/v1 -> route name (its integer parameters: apirules.INT_PARAMS). "/analyses/{id}" is
# matched separately.
ROUTES: dict[str, str] = {
    "/analyses": "analyses",
    "/stats/overview": "overview",
    "/stats/timeseries": "timeseries",
    "/stats/top-projects": "top-projects",
    "/stats/top-root-causes": "top-root-causes",
}
ONE_ANALYSIS = "/analyses/{id}"


@dataclass(frozen=True)
class RequestRecord:
    """One logged read-API request, as seen by the server."""

    method: str
    path: str
    query: dict[str, str]
    tenant: str | None
    status: int
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "query": self.query, "tenant": self.tenant,
                "status": self.status, "at": self.at}


@dataclass(frozen=True)
class Reply:
    """An answer ready to send: the WSGI layer waits `delay` seconds, then writes it."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
    delay: float = 0.0


@dataclass
class Fault:
    tenant: str | None
    endpoint: str | None
    status: int | None
    body: bytes | None
    content_type: str
    headers: dict[str, str] = field(default_factory=dict)
    latency: float = 0.0
    remaining: int | None = None
    param: str | None = None  # only requests that carry this query parameter, e.g. "cursor"

    def matches(self, tenant: str | None, route: str | None, path: str,
                query: Mapping[str, str] | None = None) -> bool:
        return _applies(self, tenant, route, path, query)


@dataclass
class Trigger:
    """An action run when a matching request arrives, before it is answered: events "during" a walk."""

    tenant: str | None
    endpoint: str | None
    param: str | None
    action: Callable[[], Any]
    remaining: int | None = 1

    def matches(self, tenant: str | None, route: str | None, path: str,
                query: Mapping[str, str] | None = None) -> bool:
        return _applies(self, tenant, route, path, query)


def _applies(rule: Fault | Trigger, tenant: str | None, route: str | None, path: str,
             query: Mapping[str, str] | None) -> bool:
    """Whether a fault's or trigger's tenant, endpoint and parameter filters (None: any) all match."""
    if rule.tenant is not None and rule.tenant != tenant:
        return False
    if rule.param is not None and rule.param not in (query or {}):
        return False
    return rule.endpoint is None or (route is not None and rule.endpoint in (route, path))


def reply_json(status: int, obj: Any, headers: Mapping[str, str] | None = None) -> Reply:
    hdrs = (("Content-Type", "application/json"), *(headers or {}).items())
    return Reply(status, json_bytes(obj), tuple(hdrs))


def route_of(path: str) -> str | None:
    """The route template a read-API path (below /api/v1) belongs to, or None."""
    if path in ROUTES:
        return path
    if path.startswith("/analyses/") and path.count("/") == 2 and len(path) > len("/analyses/"):
        return ONE_ANALYSIS
    return None


def _below_prefix(endpoint: str | None) -> str | None:
    """An endpoint filter may be given with or without the /api/v1 prefix."""
    if endpoint is not None and endpoint.startswith(API_PREFIX):
        return endpoint[len(API_PREFIX):]
    return endpoint


def _malformed_detail(token: str) -> str:
    """The server reads a non-`exl_` token as a browser session JWT; its complaint varies with the input."""
    if token.count(".") == 2:
        return "Invalid signature"
    if "." in token:
        return "Not enough segments"
    return "Malformed token"


class Simulator:
    """All state of the fake server. Thread-safe: every public method takes the one lock."""

    def __init__(self, *, seed: int = 1, clock: Callable[[], datetime] | None = None) -> None:
        self.seed = seed
        self._clock = clock
        self._frozen: datetime | None = None
        self._lock = threading.RLock()
        self._tenants: dict[str, TenantStore] = {}
        self._rngs: dict[str, random.Random] = {}
        self._tokens: dict[str, tuple[str, frozenset[str]]] = {}
        self._faults: list[Fault] = []
        self._triggers: list[Trigger] = []
        self._latency = 0.0
        self._log: deque[RequestRecord] = deque(maxlen=LOG_LIMIT)

    # -- clock ---------------------------------------------------------------------------------------

    def now(self) -> datetime:
        with self._lock:
            if self._frozen is not None:
                return self._frozen
            now = self._clock() if self._clock else datetime.now(UTC)
        return now if now.tzinfo else now.replace(tzinfo=UTC)

    def freeze(self, now: datetime | None) -> None:
        """Fix the clock at `now` (naive counts as UTC); None goes back to the running clock."""
        with self._lock:
            self._frozen = None if now is None else from_us(to_us(now))

    def _now_us(self) -> int:
        return to_us(self.now())

    # -- tenants and tokens --------------------------------------------------------------------------

    def add_tenant(self, name: str, *, history_days: int = 200, per_day: float = 8.0,
                   quiet_days: int = 0) -> None:
        """A tenant with seeded history ending `quiet_days` before now, and its two default tokens."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"tenant name {name!r}: use letters, digits, '_', '.', '-' (at most 63)")
        rng = random.Random(f"exlogare-sim:{self.seed}:{name}")  # noqa: S311 - seeded fake data
        projects = data.make_projects(rng, name)
        first_run = rng.randint(1_000, 90_000)
        now_us = self._now_us()
        failures, rcas = data.generate_history(rng, projects, now_us, history_days=history_days,
                                               per_day=per_day, quiet_days=quiet_days, first_run=first_run)
        store = TenantStore(name, projects, first_run)
        store.load(failures, rcas)
        with self._lock:
            if name in self._tenants:
                raise ValueError(f"tenant {name!r} exists already")
            self._tenants[name] = store
            self._rngs[name] = rng
            self._tokens[f"exl_sim_{name}_read"] = (name, frozenset({"read"}))
            self._tokens[f"exl_sim_{name}_ingest"] = (name, frozenset({"ingest"}))

    def tenants(self) -> list[str]:
        with self._lock:
            return list(self._tenants)

    def token(self, tenant: str, scope: str = "read") -> str:
        """The tenant's default token for `scope` (`read` or `ingest`), revoked or not."""
        self._store(tenant)
        if scope not in ("read", "ingest"):
            raise ValueError(f"scope {scope!r}: default tokens exist for 'read' and 'ingest'")
        return f"exl_sim_{tenant}_{scope}"

    def tokens(self) -> dict[str, list[dict[str, Any]]]:
        """Active tokens per tenant (it is a fake: tests and the control API may see them)."""
        with self._lock:
            out: dict[str, list[dict[str, Any]]] = {name: [] for name in self._tenants}
            for token, (tenant, scopes) in self._tokens.items():
                out[tenant].append({"token": token, "scopes": sorted(scopes)})
            return out

    def add_token(self, tenant: str, token: str, scopes: Iterable[str] = ("read",)) -> None:
        self._store(tenant)
        with self._lock:
            self._tokens[token] = (tenant, frozenset(scopes))

    def revoke(self, token: str) -> None:
        """Afterwards the token answers 401 like an unknown one. Unknown tokens are ignored."""
        with self._lock:
            self._tokens.pop(token, None)

    def _store(self, tenant: str) -> TenantStore:
        with self._lock:
            try:
                return self._tenants[tenant]
            except KeyError:
                raise KeyError(f"unknown tenant {tenant!r}") from None

    # -- events --------------------------------------------------------------------------------------

    def _project(self, store: TenantStore, rng: random.Random, project_path: Any, project_id: Any,
                 source: Any) -> tuple[str | None, str | None, str | None]:
        if project_path is _UNSET and project_id is _UNSET:
            project = rng.choices(store.projects, weights=[p.weight for p in store.projects])[0]
            pid, path, src = project.id, project.path, project.source
        else:
            path = None if project_path is _UNSET else project_path
            known = [p for p in store.projects if path is not None and p.path == path]
            if project_id is not _UNSET:
                pid = project_id
            else:
                pid = known[0].id if known else data.project_id_for(path)
            src = known[0].source if known else ("gitlab_webhook" if path else "generic")
        return pid, path, (src if source is _UNSET else source)

    def add_analyses(self, tenant: str, count: int = 1, *, severity: str | None = None,
                     created_at: datetime | None = None, project_path: str | None = _UNSET,
                     source: str | None = _UNSET, root_cause: str | None = None,
                     project_id: str | None = _UNSET, time_to_rca: float | None = None
                     ) -> list[dict[str, Any]]:
        """New RCAs, each with its failure event `time_to_rca` seconds earlier; returns copies of the items.

        Left out, `project_path`/`project_id`/`source` come from a random project of the tenant; None means
        null. All `count` RCAs share `created_at` (default: the clock's now).
        """
        if severity is not None and severity not in SEVERITIES:
            raise ValueError(f"severity {severity!r}: expected one of {', '.join(SEVERITIES)}")
        if time_to_rca is not None and time_to_rca < 0:
            raise ValueError("time_to_rca must not be negative")
        with self._lock:
            store = self._store(tenant)
            rng = self._rngs[tenant]
            us = to_us(created_at) if created_at is not None else self._now_us()
            items = []
            for _ in range(count):
                pid, path, src = self._project(store, rng, project_path, project_id, source)
                cause, sev = root_cause, severity
                if cause is None or sev is None:
                    picked, picked_sev, *_ = data.pick_cause(rng)
                    cause = picked if cause is None else cause
                    sev = picked_sev if sev is None else sev
                ttr = data.time_to_rca(rng) if time_to_rca is None else float(time_to_rca)
                item = data.build_rca(rng, us=us, run_id=store.take_run_id(), root_cause=cause, severity=sev,
                                      project_id=pid, project_path=path, source=src)
                received = us - round(ttr * US_PER_SECOND)
                store.add_failure(Failure(received, pid, path, src, True))
                store.add_rca(Rca(us, (us - received) / US_PER_SECOND, item))
                items.append(dict(item))
            return items

    def add_failures(self, tenant: str, count: int = 1, *, received_at: datetime | None = None,
                     project_path: str | None = _UNSET, source: str | None = _UNSET,
                     project_id: str | None = _UNSET) -> None:
        """Failures without a new RCA (a re-run that reused an earlier analysis)."""
        with self._lock:
            store = self._store(tenant)
            rng = self._rngs[tenant]
            us = to_us(received_at) if received_at is not None else self._now_us()
            for _ in range(count):
                pid, path, src = self._project(store, rng, project_path, project_id, source)
                store.add_failure(Failure(us, pid, path, src, False))

    # -- faults, latency, log ------------------------------------------------------------------------

    def set_fault(self, *, tenant: str | None = None, endpoint: str | None = None, status: int | None = 500,
                  body: str | bytes | None = None, content_type: str = "application/json",
                  headers: dict[str, str] | None = None, latency: float = 0.0,
                  count: int | None = None, param: str | None = None) -> None:
        """Answer matching read-API requests with `status`/`body` instead (status None: only delay them).

        `endpoint` is a path below /api/v1 such as "/stats/overview", "/analyses" or "/analyses/{id}";
        `param` narrows it to requests carrying that query parameter (e.g. "cursor": a walk's later pages);
        `count` None lasts until `clear_faults()`. The first matching active fault wins.
        """
        endpoint = _below_prefix(endpoint)
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"status {status}: not an HTTP status")
        if body is None and status is not None and 200 <= status < 300:
            body = b""  # an empty 200: as broken as any other body
        elif body is None and status is not None:
            detail = "Rate limit exceeded" if status == 429 else f"Simulated fault (HTTP {status})"
            body = json_bytes({"detail": detail})
        raw = body.encode() if isinstance(body, str) else body
        with self._lock:
            self._faults.append(Fault(tenant, endpoint, status, raw, content_type, dict(headers or {}),
                                      float(latency), count, param))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def add_trigger(self, action: Callable[[], Any], *, tenant: str | None = None,
                    endpoint: str | None = None, param: str | None = None, count: int | None = 1) -> None:
        """Run `action` (under the simulator's lock, so it may add RCAs or faults) when a matching read-API
        request arrives, before that request is answered; `count` times (None: until `clear_triggers()`).

        With `endpoint="/analyses", param="cursor"` the action happens between two pages of one walk.
        """
        with self._lock:
            self._triggers.append(Trigger(tenant, _below_prefix(endpoint), param, action, count))

    def clear_triggers(self) -> None:
        with self._lock:
            self._triggers.clear()

    def set_latency(self, seconds: float) -> None:
        """Delay every read-API answer by `seconds` (on top of any fault's latency)."""
        with self._lock:
            self._latency = max(0.0, float(seconds))

    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log)

    def clear_requests(self) -> None:
        with self._lock:
            self._log.clear()

    def _fire_triggers(self, tenant: str | None, route: str | None, path: str, query: Mapping[str, str]
                       ) -> None:
        for trigger in [t for t in self._triggers if t.matches(tenant, route, path, query)]:
            if trigger.remaining is not None:
                trigger.remaining -= 1
                if trigger.remaining <= 0:
                    self._triggers.remove(trigger)
            trigger.action()

    def _take_fault(self, tenant: str | None, route: str | None, path: str, query: Mapping[str, str]
                    ) -> Fault | None:
        for fault in self._faults:
            if fault.matches(tenant, route, path, query):
                if fault.remaining is not None:
                    fault.remaining -= 1
                    if fault.remaining <= 0:
                        self._faults.remove(fault)
                return fault
        return None

    # -- the read API --------------------------------------------------------------------------------

    def handle(self, method: str, full_path: str, query: Mapping[str, str], authorization: str | None
               ) -> Reply:
        """Answer one request for the read API (any path outside /_sim/) and log it."""
        at = time.time()
        path = full_path[len(API_PREFIX):] if full_path.startswith(API_PREFIX + "/") else ""
        with self._lock:
            tenant, auth_error = self._authenticate(authorization)
            route = route_of(path)
            self._fire_triggers(tenant, route, path, query)
            fault = self._take_fault(tenant, route, path, query)
            delay = self._latency + (fault.latency if fault else 0.0)
            if fault is not None and fault.status is not None:
                hdrs = tuple({"Content-Type": fault.content_type, **fault.headers}.items())
                reply = Reply(fault.status, fault.body or b"", hdrs, delay)
            else:
                reply = self._answer(method, path, route, query, tenant=tenant, auth_error=auth_error)
                reply = Reply(reply.status, reply.body, reply.headers, delay)
            self._log.append(RequestRecord(method, full_path, dict(query), tenant, reply.status, at))
            return reply

    def _authenticate(self, authorization: str | None) -> tuple[str | None, ApiError | None]:
        """The tenant of a known token (any scope), and the error the request gets if it lacks `read`."""
        scheme, _, token = (authorization or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return None, ApiError(401, "Missing token", {"WWW-Authenticate": "Bearer"})
        if not token.startswith("exl_"):
            return None, ApiError(401, _malformed_detail(token), {"WWW-Authenticate": "Bearer"})
        known = self._tokens.get(token)
        if known is None:
            return None, ApiError(401, "Invalid or revoked API token", {"WWW-Authenticate": "Bearer"})
        tenant, scopes = known
        if "read" not in scopes:
            return tenant, ApiError(403, "Missing scope: read")
        return tenant, None

    def _answer(self, method: str, path: str, route: str | None, query: Mapping[str, str], *,
                tenant: str | None, auth_error: ApiError | None) -> Reply:
        # FastAPI's order: routing (404, 405), then the auth dependency, then query validation.
        if route is None:
            return reply_json(404, {"detail": "Not Found"})
        if method != "GET":
            return reply_json(405, {"detail": "Method Not Allowed"}, {"Allow": "GET"})
        try:
            if auth_error is not None:
                raise auth_error
            assert tenant is not None
            return reply_json(200, self._query(self._tenants[tenant], route, path, query))
        except ApiError as exc:
            return reply_json(exc.status, exc.body, exc.headers)

    def _query(self, store: TenantStore, route: str, path: str, query: Mapping[str, str]) -> Any:
        """The JSON answer of a validated query, or ApiError."""
        if route == ONE_ANALYSIS:
            rca = store.by_id.get(parse_uuid(path.rsplit("/", 1)[1]))
            if rca is None:
                raise ApiError(404, "Not found")
            return rca.data
        name = ROUTES[route]
        q = Query(query)
        if name == "analyses":
            return self._analyses(store, q)
        ints = {p.name: p.read(q) for p in INT_PARAMS[route]}
        q.check()
        days, limit = ints["days"], ints.get("limit", 0)
        hi = self._now_us()
        lo = hi - days * US_PER_DAY
        if name == "overview":
            return store.overview(lo, hi, days)
        if name == "timeseries":
            return store.timeseries(lo, hi)
        if name == "top-projects":
            return store.top_projects(lo, hi, limit)
        return store.top_root_causes(lo, hi, limit)

    def _analyses(self, store: TenantStore, q: Query) -> dict[str, Any]:
        since = q.datetime_us("since")
        until = q.datetime_us("until")
        severity = q.text("severity")
        project = q.text("project")
        source = q.text("source")
        cursor = q.text("cursor")
        limit = ANALYSES_LIMIT.read(q)
        q.check()
        check_analyses_filters(since, until, severity)
        after = decode_cursor(cursor) if cursor is not None else None
        items, last = store.page(since=since, until=until, severity=severity, project=project,
                                 source=source, after=after, limit=limit)
        return {"items": items, "next_cursor": encode_cursor(*last) if last else None, "limit": limit}

    def stats(self, tenant: str, kind: str, **params: Any) -> Any:
        """What the read API answers a `read` token of `tenant` (raises ApiError for 4xx answers).

        `kind`: "overview", "timeseries", "top-projects", "top-root-causes" (underscores work too),
        "analyses", or any path below /api/v1 such as "/analyses/<id>". Faults and latency do not apply.
        """
        path = kind if kind.startswith("/") else {
            "analyses": "/analyses"}.get(kind, "/stats/" + kind.replace("_", "-"))
        query = {k: v if isinstance(v, str) else (v.isoformat() if isinstance(v, datetime) else str(v))
                 for k, v in params.items() if v is not None}
        with self._lock:
            store = self._store(tenant)
            route = route_of(path)
            if route is None:
                raise ValueError(f"unknown kind {kind!r}")
            return json.loads(json_bytes(self._query(store, route, path, query)))
