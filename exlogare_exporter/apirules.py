"""The Read API v1's query rules, with the server's error shapes: FastAPI's 422 lists and plain 400 details.

Shared by the simulator (which enforces them as the server does) and the proxy (which refuses a bad query
with the same answer, without an upstream call). Like FastAPI, every parameter is checked and all 422
errors are reported together; the last value of a repeated parameter wins; unknown parameters are ignored.
Times are integer microseconds since the epoch (UTC): exact, cheap to compare and to bisect.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .parse import SEVERITIES  # the values /analyses' `severity` accepts

US_PER_SECOND = 1_000_000
US_PER_DAY = 86_400 * US_PER_SECOND
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PAGE_LIMIT = 500  # the most /analyses gives in one page
MAX_WINDOW_US = 365 * US_PER_DAY  # the widest since..until window /analyses accepts


def to_us(dt: datetime) -> int:
    """A naive datetime counts as UTC, as on the server."""
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - EPOCH) // timedelta(microseconds=1)


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def iso(us: int) -> str:
    """The server's spelling: `+00:00`, microseconds, fraction dropped when zero."""
    return from_us(us).isoformat()


_INT = re.compile(r"[+-]?\d+")
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


class ApiError(Exception):
    """An error answer of the read API: `status` and the JSON `body` the server sends."""

    def __init__(self, status: int, detail: Any, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = dict(headers or {})

    @property
    def body(self) -> dict[str, Any]:
        return {"detail": self.detail}


def bad_request(detail: str) -> ApiError:
    return ApiError(400, detail)


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON, as FastAPI's JSONResponse writes it."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def _issue(where: str, name: str, kind: str, msg: str, *, value: str, ctx: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    item: dict[str, Any] = {"type": kind, "loc": [where, name], "msg": msg, "input": value}
    if ctx:
        item["ctx"] = ctx
    return item


class Query:
    """Reads typed parameters from a query, collecting 422 issues until `check()`."""

    def __init__(self, query: Mapping[str, str]) -> None:
        self._query = query
        self.issues: list[dict[str, Any]] = []

    def integer(self, name: str, default: int, ge: int, le: int) -> int:
        raw = self._query.get(name)
        if raw is None:
            return default
        if not _INT.fullmatch(raw.strip()):
            self.issues.append(_issue("query", name, "int_parsing",
                                      "Input should be a valid integer, unable to parse string as an integer",
                                      value=raw))
            return default
        value = int(raw)
        if value < ge:
            self.issues.append(_issue("query", name, "greater_than_equal",
                                      f"Input should be greater than or equal to {ge}",
                                      value=raw, ctx={"ge": ge}))
        elif value > le:
            self.issues.append(_issue("query", name, "less_than_equal",
                                      f"Input should be less than or equal to {le}",
                                      value=raw, ctx={"le": le}))
        return value

    def datetime_us(self, name: str) -> int | None:
        raw = self._query.get(name)
        if raw is None:
            return None
        us = parse_datetime_us(raw)
        if us is None:
            self.issues.append(_issue("query", name, "datetime_from_date_parsing",
                                      "Input should be a valid datetime or date, invalid format", value=raw))
        return us

    def text(self, name: str) -> str | None:
        return self._query.get(name)

    def check(self) -> None:
        if self.issues:
            raise ApiError(422, self.issues)


@dataclass(frozen=True)
class IntParam:
    """An integer query parameter as the server declares it: its default and inclusive bounds."""

    name: str
    default: int
    ge: int
    le: int

    def read(self, q: Query) -> int:
        return q.integer(self.name, self.default, self.ge, self.le)


_DAYS_180 = IntParam("days", 30, 1, 180)
_TOP_LIMIT = IntParam("limit", 10, 1, 50)
ANALYSES_LIMIT = IntParam("limit", 100, 1, PAGE_LIMIT)
# The integer parameters of the list and stats endpoints, by path below /api/v1, in the server's order.
INT_PARAMS: dict[str, tuple[IntParam, ...]] = {
    "/analyses": (ANALYSES_LIMIT,),
    "/stats/overview": (IntParam("days", 30, 1, 365),),
    "/stats/timeseries": (_DAYS_180,),
    "/stats/top-projects": (_DAYS_180, _TOP_LIMIT),
    "/stats/top-root-causes": (_DAYS_180, _TOP_LIMIT),
}


def check_analyses_filters(since: int | None, until: int | None, severity: str | None) -> None:
    """/analyses' 400s, in the server's order; they come after the 422s of `Query.check()`."""
    if severity is not None and severity not in SEVERITIES:
        raise bad_request(f"Unknown severity '{severity}': expected one of low, medium, high")
    if since is not None and until is not None:
        if since > until:
            raise bad_request("'since' must not be after 'until'")
        if until - since > MAX_WINDOW_US:
            raise bad_request("The since..until window must not exceed 365 days")


def parse_datetime_us(raw: str) -> int | None:
    """ISO 8601 with `Z`, an offset or none (naive is UTC), with or without fraction; or Unix seconds."""
    text = raw.strip()
    if _NUMBER.fullmatch(text):
        try:
            return to_us(datetime.fromtimestamp(float(text), tz=UTC))
        except (OverflowError, OSError, ValueError):
            return None
    try:
        return to_us(datetime.fromisoformat(text))
    except (ValueError, OverflowError):
        return None


def parse_uuid(raw: str, name: str = "analysis_id") -> str:
    """The canonical lower-case form, or a 422 like FastAPI's for a `UUID` path parameter."""
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise ApiError(422, [_issue("path", name, "uuid_parsing",
                                    "Input should be a valid UUID, unable to parse string as a UUID",
                                    value=raw)]) from None


def encode_cursor(us: int, item_id: str) -> str:
    raw = json.dumps({"t": us, "id": item_id}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[int, str]:
    """The keyset (created_at in µs, id) of the last item of the previous page."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        obj = json.loads(raw)
        us, item_id = obj["t"], obj["id"]
        if not isinstance(us, int) or isinstance(us, bool) or not isinstance(item_id, str):
            raise ValueError(cursor)
        return us, str(uuid.UUID(item_id))
    except (binascii.Error, ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise bad_request("Invalid cursor") from None
