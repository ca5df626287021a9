"""The WSGI app: the read API (everything outside /_sim/) and the JSON control API under /_sim/.

The control API lets tests drive a simulator running in another process. It has no authentication: it
is a fake, bound to loopback by default. Its requests are not logged.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl

from ..apirules import json_bytes
from .core import Reply, Simulator, reply_json

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]

CONTROL_PREFIX = "/_sim"
MAX_CONTROL_BODY = 1 << 20


class ControlError(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _path(environ: Environ) -> str:
    # PEP 3333: PATH_INFO holds the URL-decoded bytes as latin-1; the server's paths are UTF-8.
    return environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "replace") or "/"


@functools.lru_cache(maxsize=128)
def _status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


@functools.lru_cache(maxsize=1024)
def _query_pairs(raw: str) -> tuple[tuple[str, str], ...]:
    """A query string's parameters; the same few come again and again (each tenant, each interval)."""
    return tuple(parse_qsl(raw, keep_blank_values=True))


def make_app(sim: Simulator) -> WSGIApp:
    def app(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        path = _path(environ)
        method = environ.get("REQUEST_METHOD", "GET").upper()
        if path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/"):
            reply = _control(sim, method, path[len(CONTROL_PREFIX):], environ)
        else:
            query = dict(_query_pairs(environ.get("QUERY_STRING", "")))
            reply = sim.handle(method, path, query, environ.get("HTTP_AUTHORIZATION"))
        if reply.delay > 0:
            time.sleep(reply.delay)  # simulated slowness, outside the lock
        headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
        start_response(_status_line(reply.status), headers)
        return [reply.body]

    return app


# -- control API -------------------------------------------------------------------------------------

def _body(environ: Environ) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ControlError(400, "bad Content-Length") from None
    if length > MAX_CONTROL_BODY:
        raise ControlError(413, "body too large")
    raw = environ["wsgi.input"].read(length) if length else b""
    if not raw.strip():
        return {}
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ControlError(400, "body is not JSON") from None
    if not isinstance(obj, dict):
        raise ControlError(400, "body must be a JSON object")
    return obj


def _when(value: Any, key: str) -> datetime | None:
    if value is None:
        return None
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        raise ControlError(400, f"{key}: not an ISO 8601 datetime: {value!r}") from None


def _required(body: dict[str, Any], key: str) -> str:
    if body.get(key) is None:
        raise ControlError(400, f"missing {key!r}")
    return str(body[key])


def _optional(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    """Keys present in the body (null included: it means null); absent ones keep the default."""
    return {k: body[k] for k in keys if k in body}


def _tenant_list(sim: Simulator) -> dict[str, Any]:
    """name -> {"tokens": {"read": …, "ingest": …} (the defaults), "active_tokens": [{token, scopes}]}."""
    active = sim.tokens()
    return {name: {"tokens": {"read": sim.token(name, "read"), "ingest": sim.token(name, "ingest")},
                   "active_tokens": active[name]}
            for name in sim.tenants()}


Handler = Callable[[Simulator, str, Environ, list[str]], Any]


def _health(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    return {"status": "ok", "now": sim.now().isoformat(), "tenants": len(sim.tenants())}


def _tenants(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    if method == "POST":
        body = _body(environ)
        sim.add_tenant(_required(body, "name"), **_optional(body, "history_days", "per_day", "quiet_days"))
    return _tenant_list(sim)


def _analyses(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    body = _body(environ)
    kwargs = _optional(body, "severity", "project_path", "project_id", "source", "root_cause", "time_to_rca")
    items = sim.add_analyses(args[0], int(body.get("count", 1)),
                             created_at=_when(body.get("created_at"), "created_at"), **kwargs)
    return {"items": items}


def _failures(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    body = _body(environ)
    count = int(body.get("count", 1))
    sim.add_failures(args[0], count, received_at=_when(body.get("received_at"), "received_at"),
                     **_optional(body, "project_path", "project_id", "source"))
    return {"added": count}


def _tokens(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    body = _body(environ)
    sim.add_token(_required(body, "tenant"), _required(body, "token"), body.get("scopes", ["read"]))
    return {"ok": True}


def _faults(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    if method == "DELETE":
        sim.clear_faults()
    else:
        sim.set_fault(**_optional(_body(environ), "tenant", "endpoint", "status", "body", "content_type",
                                  "headers", "latency", "count", "param"))
    return {"ok": True}


def _triggers(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    """POST {"tenant", "endpoint", "param", "count", "add_analyses": {…}}: RCAs added when a matching request
    arrives (e.g. the second page of a walk), before it is answered. DELETE clears them."""
    if method == "DELETE":
        sim.clear_triggers()
        return {"ok": True}
    body = _body(environ)
    spec = body.get("add_analyses")
    if not isinstance(spec, dict):
        raise ControlError(400, "add_analyses must be an object like the body of /_sim/tenants/*/analyses")
    target = str(spec.get("tenant") or _required(body, "tenant"))
    sim.token(target)  # an unknown tenant is a 404 now, not a failure inside a later request
    kwargs = _optional(spec, "severity", "project_path", "project_id", "source", "root_cause", "time_to_rca")
    count, created_at = int(spec.get("count", 1)), _when(spec.get("created_at"), "created_at")
    sim.add_trigger(lambda: sim.add_analyses(target, count, created_at=created_at, **kwargs),
                    **_optional(body, "tenant", "endpoint", "param", "count"))
    return {"ok": True}


def _latency(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    sim.set_latency(float(_body(environ).get("seconds", 0.0)))
    return {"ok": True}


def _revoke(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    sim.revoke(_required(_body(environ), "token"))
    return {"ok": True}


def _clock(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    sim.freeze(_when(_body(environ).get("now"), "now"))
    return {"now": sim.now().isoformat()}


def _requests(sim: Simulator, method: str, environ: Environ, args: list[str]) -> Any:
    if method == "DELETE":
        sim.clear_requests()
        return {"ok": True}
    return [r.as_dict() for r in sim.requests()]


# path pattern ("*" is a tenant name) -> (allowed methods, handler)
CONTROL_ROUTES: dict[tuple[str, ...], tuple[tuple[str, ...], Handler]] = {
    ("health",): (("GET",), _health),
    ("tenants",): (("GET", "POST"), _tenants),
    ("tenants", "*", "analyses"): (("POST",), _analyses),
    ("failures", "*"): (("POST",), _failures),
    ("tokens",): (("POST",), _tokens),
    ("faults",): (("POST", "DELETE"), _faults),
    ("triggers",): (("POST", "DELETE"), _triggers),
    ("latency",): (("POST",), _latency),
    ("revoke",): (("POST",), _revoke),
    ("clock",): (("POST",), _clock),
    ("requests",): (("GET", "DELETE"), _requests),
}


def _match(parts: list[str]) -> tuple[tuple[tuple[str, ...], Handler], list[str]] | None:
    for pattern, entry in CONTROL_ROUTES.items():
        if len(pattern) == len(parts) and all(p in ("*", q) for p, q in zip(pattern, parts, strict=True)):
            return entry, [q for p, q in zip(pattern, parts, strict=True) if p == "*"]
    return None


def _control(sim: Simulator, method: str, path: str, environ: Environ) -> Reply:
    found = _match([p for p in path.split("/") if p])
    if found is None:
        return reply_json(404, {"detail": "Not Found"})
    (methods, handler), args = found
    if method not in methods:
        return reply_json(405, {"detail": "Method Not Allowed"}, {"Allow": ", ".join(methods)})
    try:
        return reply_json(200, handler(sim, method, environ, args))
    except ControlError as exc:
        return reply_json(exc.status, {"detail": exc.detail})
    except KeyError as exc:
        return reply_json(404, {"detail": str(exc.args[0]) if exc.args else "not found"})
    except (ValueError, TypeError) as exc:
        return reply_json(400, {"detail": str(exc)})


__all__ = ["WSGIApp", "json_bytes", "make_app"]
