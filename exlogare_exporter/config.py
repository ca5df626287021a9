"""Load and validate the YAML configuration into frozen dataclasses.

Every error is a `ConfigError` whose message starts with the key path (`tenants[1].windows[2]: ...`), so an
operator can find the line at once. The keys and their parsers live in three tables (`TOP_LEVEL_KEYS`,
`INHERITED_KEYS`, `TENANT_ONLY_KEYS`): adding a key is one line there plus a dataclass field.
Tokens are wrapped in `Secret` as soon as they are read and never formatted into a message.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from .secrets import Secret

DEFAULT_BASE_URL = "https://api.exlogare.net"
TOKEN_PREFIX = "exl_"  # noqa: S105 - a prefix, not a password
_MAX_TOKEN_FILE_BYTES = 64 * 1024


class ConfigError(Exception):
    """A configuration problem; the message is `<key path>: <reason>`.

    `ConfigError(key_path, reason)`, or `ConfigError("<key path>: <reason>")` for a message already built
    (that form also lets the exception survive pickling).
    """

    def __init__(self, key_path: str, reason: str | None = None) -> None:
        if reason is None:
            key_path, _, reason = key_path.partition(": ")
        super().__init__(f"{key_path}: {reason}")
        self.key_path = key_path
        self.reason = reason


# --- value types --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Window:
    """A stats window: `label` is the metric label (`"7d"`), `days` the `days` query parameter."""

    label: str
    days: int


@dataclass(frozen=True)
class TokenSource:
    """Where a tenant's token comes from, kept so a reload (SIGHUP) can read it again.

    `ref` is the variable name (`env`), the absolute path (`file`) or `"(inline)"`; an inline token is held
    in `inline`, a `Secret`, so the repr stays clean.
    """

    kind: Literal["env", "file", "inline"]
    ref: str
    inline: Secret | None = None

    @property
    def key(self) -> str:
        """The config key this source came from, for building key paths (`tenants[0].` + key)."""
        return {"env": "token_env", "file": "token_file", "inline": "token"}[self.kind]

    def read(self, key_path: str, environ: Mapping[str, str] | None = None) -> Secret:
        """The token, stripped; `key_path` (e.g. `tenants[0].token_file`) prefixes any error."""
        if self.kind == "env":
            env = os.environ if environ is None else environ
            if self.ref not in env:
                raise ConfigError(key_path, f"environment variable {self.ref} is not set")
            return _checked_token(env[self.ref], key_path, f"environment variable {self.ref}")
        if self.kind == "file":
            try:
                with open(self.ref, encoding="utf-8") as handle:
                    text = handle.read(_MAX_TOKEN_FILE_BYTES + 1)
            except OSError as exc:
                raise ConfigError(key_path, f"cannot read {self.ref}: {exc.strerror or 'error'}") from None
            except UnicodeDecodeError:
                raise ConfigError(key_path, f"{self.ref} is not UTF-8 text") from None
            if len(text) > _MAX_TOKEN_FILE_BYTES:
                raise ConfigError(key_path, f"{self.ref} is too large to hold a token")
            return _checked_token(text, key_path, self.ref)
        return _checked_token(self.inline.reveal() if self.inline else "", key_path, "the inline token")


def _checked_token(text: str, key_path: str, where: str) -> Secret:
    token = text.strip()
    if not token:
        raise ConfigError(key_path, f"{where} is empty")
    if not (token.isascii() and token.isprintable()) or any(ch.isspace() for ch in token):
        # It goes into an HTTP header: fail here, with the key path, rather than at every refresh.
        raise ConfigError(key_path, f"the token from {where} contains whitespace, control or non-ASCII "
                                    "characters")
    return Secret(token)


@dataclass(frozen=True)
class TenantConfig:
    """One tenant, fully resolved: defaults applied, durations in seconds, token read."""

    name: str
    base_url: str
    token: Secret
    token_source: TokenSource
    interval: float
    jitter: float
    windows: tuple[Window, ...]
    top_windows: tuple[Window, ...]
    timeseries_days: int
    top_limit: int
    timeout: float
    connect_timeout: float
    retries: int
    max_staleness: float
    allow_insecure_http: bool
    ca_file: str | None
    label_max_length: int
    max_response_bytes: int
    max_requests_per_second: float
    analyses_interval: float  # 0: the /analyses stream is off for this tenant
    analyses_lookback: float
    analyses_max_pages: int
    analyses_labels: tuple[str, ...]  # a subset of ANALYSES_LABELS, in that order
    max_label_values: int
    max_requests_burst: float  # requests that may leave at once after a quiet spell
    # One budget for every tenant with this base_url (a self-hosted server shared by many tenants); 0 = none.
    base_url_max_requests_per_second: float
    base_url_max_requests_burst: float


@dataclass(frozen=True)
class ProxyClient:
    """A client of the Grafana datasource proxy: its own token, and the tenants it may read."""

    name: str
    token: Secret
    token_source: TokenSource
    tenants: tuple[str, ...]


@dataclass(frozen=True)
class ProxyConfig:
    """The `proxy:` section; durations in seconds, sizes in bytes, client tokens read."""

    enabled: bool = False
    cache_ttl: float = 30.0
    cache_stale_ttl: float = 600.0
    cache_max_entries: int = 1000
    cache_max_bytes: int = 64 * 1024**2
    max_items: int = 10_000
    clients: tuple[ProxyClient, ...] = ()


@dataclass(frozen=True)
class Config:
    """The whole file, validated. `warnings` are for the caller to log; they never hold a token."""

    listen_host: str
    listen_port: int
    concurrency: int
    tenants: tuple[TenantConfig, ...]
    warnings: tuple[str, ...] = ()
    source: str | None = None
    proxy: ProxyConfig = ProxyConfig()


# --- scalar parsers (pure; ValueError carries the reason) ---------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_DURATION_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}  # in the order they must appear
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_HELP = "use 30s, 5m, 1h, 1h30m, 250ms or a number of seconds"


def parse_duration(value: object) -> float:
    """Seconds from `30s`, `5m`, `1h30m`, `250ms` or a plain number, the forms Prometheus users know."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"must be a duration ({_DURATION_HELP}), got {_kind(value)}")
    seconds = _duration_from_text(value.strip()) if isinstance(value, str) else float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value!r} is not a duration; it must be a finite number of seconds, 0 or more")
    return seconds


def _duration_from_text(text: str) -> float:
    if _NUMBER.fullmatch(text):
        return float(text)
    units = list(_DURATION_UNITS)
    total, pos, last = 0.0, 0, -1
    if not text:
        raise ValueError(f"an empty string is not a duration; {_DURATION_HELP}")
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        rank = units.index(match[2]) if match else -1
        if match is None or rank <= last:  # each unit once, largest first: 1h30m, not 30m1h
            raise ValueError(f"{text!r} is not a duration; {_DURATION_HELP}")
        total += float(match[1]) * _DURATION_UNITS[match[2]]
        pos, last = match.end(), rank
    return total


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|kB|KB|MB|GB|KiB|MiB|GiB)?")
_SIZE_UNITS = {None: 1, "B": 1, "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
               "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_size(value: object) -> int:
    """Bytes from an int or `512KiB`, `10MiB`, `1MB`: KB/MB/GB count in 1000s, KiB/MiB/GiB in 1024s."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if not isinstance(value, str):
        raise ValueError(f"must be a size such as 10MiB or a number of bytes, got {_kind(value)}")
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a size; use a number of bytes or 512KiB, 10MiB, 1MB")
    return int(float(match[1]) * _SIZE_UNITS[match[2]])


def _kind(value: object) -> str:
    """The YAML type of a value, for messages that must not echo the value (it could be a token)."""
    if value is None:
        return "nothing (null)"
    for cls, name in ((bool, "a boolean"), (int, "a whole number"), (float, "a number"), (str, "a string"),
                      (list, "a list"), (Mapping, "a mapping")):
        if isinstance(value, cls):
            return name
    return f"a {type(value).__name__}"


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds * 1000:g}ms" if 0 < seconds < 1 else f"{seconds:g}s"


def _fmt_bytes(size: int) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


# --- key parsers: (value, key path, context) -> parsed value, or ConfigError --------------------------------

@dataclass(frozen=True)
class _Context:
    base_dir: str
    environ: Mapping[str, str]


Parser = Callable[[Any, str, _Context], Any]


def _string(value: Any, path: str, what: str = "a string") -> str:
    if not isinstance(value, str):
        raise ConfigError(path, f"must be {what}, got {_kind(value)}")
    return value


def _int(low: int, high: int, why: str = "") -> Parser:
    def parse(value: Any, path: str, ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            hint = "; write the number without quotes" if isinstance(value, str) else ""
            raise ConfigError(path, f"must be a whole number from {low} to {high}, got {_kind(value)}{hint}")
        if not low <= value <= high:
            raise ConfigError(path, f"{value} is outside {low}..{high}" + (f" ({why})" if why else ""))
        return value
    return parse


def _duration(minimum: float = 0.0, positive: bool = False) -> Parser:
    def parse(value: Any, path: str, ctx: _Context) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None
        if positive and seconds <= 0:
            raise ConfigError(path, "must be more than 0s")
        if seconds < minimum:
            raise ConfigError(path, f"{_fmt_seconds(seconds)} is under {_fmt_seconds(minimum)}, "
                                    "the shortest allowed")
        return seconds
    return parse


def _bool(value: Any, path: str, ctx: _Context) -> bool:
    if not isinstance(value, bool):
        hint = "; write true or false without quotes" if isinstance(value, str) else ""
        raise ConfigError(path, f"must be true or false, got {_kind(value)}{hint}")
    return value


def _size(low: int, high: int) -> Parser:
    def parse(value: Any, path: str, ctx: _Context) -> int:
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise ConfigError(path, str(exc)) from None
        if not low <= size <= high:
            raise ConfigError(path, f"{_fmt_bytes(size)} is outside {_fmt_bytes(low)}..{_fmt_bytes(high)}")
        return size
    return parse


def _number(low: float, what: str, allowed: str) -> Parser:
    def parse(value: Any, path: str, ctx: _Context) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(path, f"must be {what}, got {_kind(value)}")
        if not math.isfinite(value) or value < low:
            raise ConfigError(path, f"{value} is not allowed; {allowed}")
        return float(value)
    return parse


_rate = _number(0, "a number (0 = unlimited)", "use 0 (unlimited) or a number above 0")
_burst = _number(1, "a number of requests (1 or more)", "a burst is 1 request or more")


def _analyses_interval(value: Any, path: str, ctx: _Context) -> float:
    seconds = _duration()(value, path, ctx)
    if 0 < seconds < 1:
        raise ConfigError(path, f"{_fmt_seconds(seconds)} is under 1s; use 0 to turn the stream off, "
                                "or 1s or more")
    return seconds


def _analyses_lookback(value: Any, path: str, ctx: _Context) -> float:
    seconds = _duration()(value, path, ctx)
    if seconds > MAX_LOOKBACK_SECONDS:
        raise ConfigError(path, f"{_fmt_seconds(seconds)} is over 365 days (8760h), the longest lookback")
    return seconds


ANALYSES_LABELS = ("project", "source")
MAX_LOOKBACK_SECONDS = 365 * 86400.0


def _analyses_labels(value: Any, path: str, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list such as [project] or [project, source], got {_kind(value)}")
    for index, item in enumerate(value):
        if item not in ANALYSES_LABELS:
            shown = repr(item) if isinstance(item, str) else _kind(item)
            raise ConfigError(f"{path}[{index}]", f"{shown} is not an optional label; "
                                                  f"choose from {', '.join(ANALYSES_LABELS)}")
        if value.index(item) != index:
            raise ConfigError(f"{path}[{index}]", f"{item} is listed twice")
    return tuple(label for label in ANALYSES_LABELS if label in value)


def _window(value: Any, path: str, max_days: int, accepted_by: str) -> Window:
    if isinstance(value, int) and not isinstance(value, bool):
        days = value
    elif isinstance(value, str) and (match := re.fullmatch(r"(\d+)d", value.strip())):
        days = int(match[1])
    else:
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise ConfigError(path, f"{shown} is not a window; write it as 7d or 7 (days)")
    if days < 1:
        raise ConfigError(path, f"{days}d is under 1 day")
    if days > max_days:
        raise ConfigError(path, f"{days}d is over {max_days} days, the most {accepted_by}")
    return Window(f"{days}d", days)


def _windows(max_days: int, accepted_by: str) -> Parser:
    def parse(value: Any, path: str, ctx: _Context) -> tuple[Window, ...]:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list of windows such as [1d, 7d, 30d], got {_kind(value)}")
        if not value:
            raise ConfigError(path, "must list at least one window")
        seen: dict[int, int] = {}
        for index, item in enumerate(value):
            window = _window(item, f"{path}[{index}]", max_days, accepted_by)
            if window.days in seen:
                raise ConfigError(f"{path}[{index}]",
                                  f"{window.label} is listed twice (also at {path}[{seen[window.days]}])")
            seen[window.days] = index
        return tuple(Window(f"{days}d", days) for days in seen)
    return parse


_OVERVIEW_LIMIT = "/stats/overview accepts"
_TOP_LIMIT = "/stats/top-projects and /stats/top-root-causes accept"


def _base_url(value: Any, path: str, ctx: _Context) -> str:
    text = _string(value, path, "a URL such as https://api.exlogare.net").strip()
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        raise ConfigError(path, f"{text!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(path, f"{text!r} must start with https:// (or http://)")
    if parts.username is not None or parts.password is not None:
        # Not echoed: the user:password part is a credential.
        raise ConfigError(path, "must not hold user:password@; the exporter authenticates with the token")
    if not parts.hostname or any(ch.isspace() for ch in text):
        raise ConfigError(path, f"{text!r} has no valid host")
    if "?" in text or "#" in text:
        raise ConfigError(path, f"{text!r} must not have a query (?...) or a fragment (#...)")
    # Users paste either the server root or the API root; both mean the same server.
    url_path = parts.path.rstrip("/")
    if url_path.endswith("/api/v1"):
        url_path = url_path[: -len("/api/v1")].rstrip("/")
    return f"{parts.scheme}://{parts.netloc}{url_path}"


def _resolve_path(text: str, ctx: _Context) -> str:
    return os.path.normpath(os.path.join(ctx.base_dir, os.path.expanduser(text)))


def _ca_file(value: Any, path: str, ctx: _Context) -> str | None:
    if value is None:
        return None
    resolved = _resolve_path(_string(value, path, "a file path"), ctx)
    if not os.path.exists(resolved):
        raise ConfigError(path, f"{resolved} does not exist")
    if not os.path.isfile(resolved) or not os.access(resolved, os.R_OK):
        raise ConfigError(path, f"{resolved} is not a readable file")
    return resolved


def _not_a_token(text: str, path: str, what: str) -> None:
    # A pasted token in the wrong key must not then be echoed as a "variable name" or "file name".
    if text.strip().startswith(TOKEN_PREFIX):
        raise ConfigError(path, f"this looks like a token, not {what}; "
                                "put the token in an environment variable or a file")


def _token_env(value: Any, path: str, ctx: _Context) -> str:
    name = _string(value, path, "the name of an environment variable").strip()
    _not_a_token(name, path, "the name of an environment variable")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ConfigError(path, "must be the name of an environment variable (letters, digits and _)")
    return name


def _token_file(value: Any, path: str, ctx: _Context) -> str:
    text = _string(value, path, "a file path").strip()
    _not_a_token(text, path, "a file path")
    if not text:
        raise ConfigError(path, "is empty; give the path of the file holding the token")
    return _resolve_path(text, ctx)


def _inline_token(value: Any, path: str, ctx: _Context) -> Secret:
    return Secret(_string(value, path))


_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _name(what: str) -> Parser:
    """A tenant's or a proxy client's name: they become label values, log fields and URL path segments,
    hence the strict alphabet (and a pasted token refused before it is echoed)."""
    def parse(value: Any, path: str, ctx: _Context) -> str:
        name = _string(value, path)
        _not_a_token(name, path, f"a {what} name")
        if not _TENANT_NAME.fullmatch(name):
            raise ConfigError(path, f"{name!r} is not a valid {what} name; use 1 to 63 letters, digits, "
                                    "_ . or -, starting with a letter or digit")
        return name
    return parse


_tenant_name = _name("tenant")


def parse_listen_address(text: str) -> tuple[str, int]:
    """`(host, port)` from `0.0.0.0:10450`, `[::]:10450` or `:10450` (= 0.0.0.0); ValueError otherwise."""
    text = text.strip()
    match = re.fullmatch(r"(?:\[([0-9A-Fa-f:.%\w]*)\]|([\w.-]*)):(\d{1,5})", text)
    if match is None:
        raise ValueError(f"{text!r} is not host:port; write 0.0.0.0:10450, [::]:10450 or :10450")
    if match[1] is not None:
        try:
            ipaddress.IPv6Address(match[1].split("%")[0])
        except ValueError:
            raise ValueError(f"{match[1]!r} in brackets is not an IPv6 address") from None
    port = int(match[3])
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1..65535")
    host = match[1] if match[1] is not None else match[2]
    return host or "0.0.0.0", port


def _listen_address(value: Any, path: str, ctx: _Context) -> tuple[str, int]:
    try:
        return parse_listen_address(_string(value, path, "host:port"))
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def _mapping(value: Any, path: str, ctx: _Context) -> Mapping[Any, Any]:
    if value is None:  # `defaults:` with nothing under it
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping of keys, got {_kind(value)}")
    return value


def _tenant_list(value: Any, path: str, ctx: _Context) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of tenants, got {_kind(value)}")
    if not value:
        raise ConfigError(path, "is empty; list at least one tenant with a name and a token")
    return value


# --- the key tables -----------------------------------------------------------------------------------------

class _Marker(enum.Enum):
    REQUIRED = "required"
    DERIVED = "derived"  # computed from other keys in `_derive`


REQUIRED = _Marker.REQUIRED
DERIVED = _Marker.DERIVED


@dataclass(frozen=True)
class Key:
    """A known key: how to parse it and its default (already parsed), or REQUIRED / DERIVED."""

    parse: Parser
    default: Any = REQUIRED
    missing: str = "is required"


DEFAULT_WINDOWS = (Window("1d", 1), Window("7d", 7), Window("30d", 30))

# Keys a tenant inherits from `defaults:` and may override.
INHERITED_KEYS: dict[str, Key] = {
    "base_url": Key(_base_url, DEFAULT_BASE_URL),
    "interval": Key(_duration(minimum=5.0), 60.0),
    "jitter": Key(_duration(), DERIVED),  # min(10% of interval, 30s)
    "windows": Key(_windows(365, _OVERVIEW_LIMIT), DEFAULT_WINDOWS),
    "top_windows": Key(_windows(180, _TOP_LIMIT), DERIVED),  # = windows
    "timeseries_days": Key(_int(1, 180, "180 is the most /stats/timeseries accepts"), 30),
    "top_limit": Key(_int(1, 50, "50 is the most the top lists accept"), 10),
    "timeout": Key(_duration(positive=True), 10.0),
    "connect_timeout": Key(_duration(positive=True), 5.0),
    "retries": Key(_int(0, 10), 2),
    "max_staleness": Key(_duration(positive=True), DERIVED),  # 5 x interval
    "allow_insecure_http": Key(_bool, False),
    "ca_file": Key(_ca_file, None),
    "label_max_length": Key(_int(16, 1024), 120),
    "max_response_bytes": Key(_size(1024, 1024**3), 10 * 1024**2),
    "max_requests_per_second": Key(_rate, 0.0),
    "max_requests_burst": Key(_burst, DERIVED),  # the rate, at least 1
    "base_url_max_requests_per_second": Key(_rate, 0.0),
    "base_url_max_requests_burst": Key(_burst, DERIVED),  # the base-URL rate, at least 1
    "analyses_interval": Key(_analyses_interval, 30.0),
    "analyses_lookback": Key(_analyses_lookback, 0.0),
    "analyses_max_pages": Key(_int(1, 1000), 20),
    "analyses_labels": Key(_analyses_labels, ()),
    "max_label_values": Key(_int(1, 10000), 50),
}

# Keys only a tenant entry may hold.
TENANT_ONLY_KEYS: dict[str, Key] = {
    "name": Key(_tenant_name, missing="is required; every tenant needs a name (it becomes the tenant label)"),
    "token_env": Key(_token_env, None),
    "token_file": Key(_token_file, None),
    "token": Key(_inline_token, None),
}
TENANT_KEYS: dict[str, Key] = {**TENANT_ONLY_KEYS, **INHERITED_KEYS}
TOKEN_KEYS = ("token_env", "token_file", "token")

TOP_LEVEL_KEYS: dict[str, Key] = {
    "listen_address": Key(_listen_address, ("0.0.0.0", 10450)),
    "concurrency": Key(_int(1, 256), 8),
    "defaults": Key(_mapping, {}),
    "tenants": Key(_tenant_list, missing="is required; list at least one tenant with a name and a token"),
    "proxy": Key(_mapping, {}),
}


_Parsed = dict[str, tuple[Any, str]]  # key -> (parsed value, key path it came from)


def _join(path: str, key: object) -> str:
    # A pasted token used as a key must not be echoed back in a key path.
    shown = "(a key that looks like a token)" if str(key).startswith(TOKEN_PREFIX) else str(key)
    return f"{path}.{shown}" if path else shown


def _parse_section(raw: Mapping[Any, Any], path: str, table: Mapping[str, Key], ctx: _Context,
                   misplaced: Mapping[str, str] | None = None) -> _Parsed:
    """Refuse unknown keys, parse the present ones in table order, demand the required ones."""
    for key in raw:
        if key not in table:
            key_path = _join(path, key)
            if misplaced and key in misplaced:
                raise ConfigError(key_path, misplaced[key])
            close = difflib.get_close_matches(str(key), list(table), n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise ConfigError(key_path, f"unknown key.{hint} Allowed here: {', '.join(table)}")
    parsed: _Parsed = {}
    for key, spec in table.items():
        key_path = _join(path, key)
        if key in raw:
            parsed[key] = (spec.parse(raw[key], key_path, ctx), key_path)
        elif spec.default is REQUIRED:
            raise ConfigError(key_path, spec.missing)
    return parsed


# --- environment expansion ----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\$\{|\$\{([^}]*)(\}?)")


def _expand(node: Any, path: str, environ: Mapping[str, str]) -> Any:
    """`${VAR}` in every string value, before validation, so a bad value is reported like a typed one."""
    if isinstance(node, Mapping):
        return {key: _expand(value, _join(path, key), environ) for key, value in node.items()}
    if isinstance(node, list):
        return [_expand(item, f"{path}[{index}]", environ) for index, item in enumerate(node)]
    if not isinstance(node, str) or "${" not in node:
        return node

    def substitute(match: re.Match[str]) -> str:
        if match[0] == "$${":
            return "${"
        name = match[1]
        if not match[2]:
            raise ConfigError(path, "has an unterminated ${; write $${ for a literal ${")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(path, "has a ${...} that is not a variable name; write $${ for a literal ${")
        if name not in environ:
            raise ConfigError(path, f"environment variable {name} is not set (used as ${{{name}}})")
        return environ[name]

    return _VAR.sub(substitute, node)


# --- tenants ------------------------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _derive_bursts(values: dict[str, Any]) -> None:
    """A burst left out is the rate (at least one request): a second's worth at once."""
    for burst, rate in (("max_requests_burst", "max_requests_per_second"),
                        ("base_url_max_requests_burst", "base_url_max_requests_per_second")):
        if values[burst] is DERIVED:
            values[burst] = max(1.0, values[rate])


def _derive(tenant_path: str, layers: tuple[_Parsed, ...]) -> dict[str, Any]:
    """Merge built-in defaults, `defaults:` and the tenant's own keys; fill derived values; cross-check."""
    values: dict[str, Any] = {key: spec.default for key, spec in INHERITED_KEYS.items()}
    origin: dict[str, str] = {key: _join(tenant_path, key) for key in INHERITED_KEYS}
    for layer in layers:
        for key in INHERITED_KEYS:
            if key in layer:
                values[key], origin[key] = layer[key]
    interval = values["interval"]
    set_by = f"from {origin['interval']}" if any("interval" in layer for layer in layers) else "the default"

    if values["top_windows"] is DERIVED:
        for index, window in enumerate(values["windows"]):
            if window.days > 180:
                raise ConfigError(f"{origin['windows']}[{index}]",
                                  f"{window.label} is over 180 days, the most {_TOP_LIMIT}; top_windows "
                                  "defaults to windows, so set top_windows to windows of 180 days or fewer")
        values["top_windows"] = values["windows"]

    _derive_bursts(values)
    if values["jitter"] is DERIVED:
        values["jitter"] = min(0.1 * interval, 30.0)
    elif values["jitter"] > interval:
        raise ConfigError(origin["jitter"], f"{_fmt_seconds(values['jitter'])} is more than the interval "
                                            f"({_fmt_seconds(interval)}, {set_by}); "
                                            "jitter must be between 0 and the interval")

    if values["max_staleness"] is DERIVED:
        values["max_staleness"] = 5 * interval
    elif values["max_staleness"] < interval:
        raise ConfigError(origin["max_staleness"],
                          f"{_fmt_seconds(values['max_staleness'])} is shorter than the interval "
                          f"({_fmt_seconds(interval)}, {set_by}); data would go stale "
                          "between two refreshes")

    parts = urlsplit(values["base_url"])
    loopback = _is_loopback(parts.hostname or "")
    if parts.scheme == "http" and not values["allow_insecure_http"] and not loopback:
        raise ConfigError(origin["base_url"],
                          f"{values['base_url']} is plain HTTP to a host that is not loopback, so the token "
                          "would cross the network in clear; use https://, or set allow_insecure_http: true "
                          "on this tenant (or under defaults) if the network is trusted")
    return values


def _token_source(own: _Parsed, tenant_path: str) -> tuple[TokenSource, str]:
    present = [key for key in TOKEN_KEYS if key in own]
    if not present:
        raise ConfigError(tenant_path, "no token; set one of token_env, token_file or token")
    if len(present) > 1:
        verb = "are both set" if len(present) == 2 else "are all set"
        raise ConfigError(tenant_path, f"{' and '.join(present)} {verb}; keep exactly one token source")
    key = present[0]
    value, key_path = own[key]
    if key == "token_env":
        return TokenSource("env", value), key_path
    if key == "token_file":
        return TokenSource("file", value), key_path
    return TokenSource("inline", "(inline)", value), key_path


def _token_warnings(tenant_path: str, source: TokenSource, key_path: str, token: Secret,
                    warn_inline: bool) -> list[str]:
    warnings = []
    if not token.reveal().startswith(TOKEN_PREFIX):
        warnings.append(f"{tenant_path}: the token does not start with {TOKEN_PREFIX}; "
                        "Exlogare read tokens do")
    return warnings + _source_warnings(source, key_path, warn_inline)


def _source_warnings(source: TokenSource, key_path: str, warn_inline: bool) -> list[str]:
    """Where a token is kept: inline in the config file, or in a file others can read."""
    warnings = []
    if source.kind == "inline" and warn_inline:
        warnings.append(f"{key_path}: inline tokens are discouraged; use token_env or token_file so the "
                        "token stays out of the config file")
    if source.kind == "file" and os.name == "posix":
        try:
            mode = stat.S_IMODE(os.stat(source.ref).st_mode)
        except OSError:
            mode = 0
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            warnings.append(f"{key_path}: {source.ref} is readable by group or others (mode {mode:04o}); "
                            "chmod 600 it")
    return warnings


def _tenant(raw: Any, tenant_path: str, defaults: _Parsed, ctx: _Context,
            warn_inline: bool) -> tuple[TenantConfig, list[str]]:
    if not isinstance(raw, Mapping):
        raise ConfigError(tenant_path, f"must be a mapping with a name and a token source, got {_kind(raw)}")
    own = _parse_section(raw, tenant_path, TENANT_KEYS, ctx)
    values = _derive(tenant_path, (defaults, own))
    source, key_path = _token_source(own, tenant_path)
    token = source.read(key_path, ctx.environ)
    tenant = TenantConfig(name=own["name"][0], token=token, token_source=source, **values)
    return tenant, _token_warnings(tenant_path, source, key_path, token, warn_inline)


SHARED_LIMIT_KEYS = ("base_url_max_requests_per_second", "base_url_max_requests_burst")


def _check_shared_limit(tenant: TenantConfig, index: int, earlier: list[TenantConfig]) -> None:
    """Tenants with one base_url share one request budget, so they must agree on it."""
    for other_index, other in enumerate(earlier):
        if other.base_url != tenant.base_url:
            continue
        for key in SHARED_LIMIT_KEYS:
            if getattr(tenant, key) != getattr(other, key):
                raise ConfigError(f"tenants[{index}].{key}", f"{getattr(tenant, key):g} differs from "
                                  f"tenants[{other_index}] ({getattr(other, key):g}), which has the same "
                                  "base_url and so the same budget; set it once, under defaults")
        return


# --- the Grafana datasource proxy ---------------------------------------------------------------------------

PROXY_TOKEN_MIN_CHARS = 16


_client_name = _name("client")


def _name_list(value: Any, path: str, ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ConfigError(path, f"must be a list of tenant names such as [acme], got {_kind(value)}")
    if not value:
        raise ConfigError(path, "is empty; list the tenants this client may read")
    names = [_tenant_name(item, f"{path}[{index}]", ctx) for index, item in enumerate(value)]
    for index, name in enumerate(names):
        if names.index(name) != index:
            raise ConfigError(f"{path}[{index}]", f"{name} is listed twice")
    return tuple(names)


def _client_list(value: Any, path: str, ctx: _Context) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(path, "must be a list of clients (each a name, a token source and tenants), "
                                f"got {_kind(value)}")
    return value


_PROXY_DEFAULTS = ProxyConfig()
PROXY_KEYS: dict[str, Key] = {
    "enabled": Key(_bool, _PROXY_DEFAULTS.enabled),
    "cache_ttl": Key(_duration(), _PROXY_DEFAULTS.cache_ttl),
    "cache_stale_ttl": Key(_duration(), _PROXY_DEFAULTS.cache_stale_ttl),
    "cache_max_entries": Key(_int(1, 1_000_000), _PROXY_DEFAULTS.cache_max_entries),
    "cache_max_bytes": Key(_size(1024, 64 * 1024**3), _PROXY_DEFAULTS.cache_max_bytes),
    "max_items": Key(_int(1, 1_000_000), _PROXY_DEFAULTS.max_items),
    "clients": Key(_client_list, []),
}
PROXY_CLIENT_KEYS: dict[str, Key] = {
    "name": Key(_client_name, missing="is required; every proxy client needs a name (it is shown in logs)"),
    "token_env": Key(_token_env, None),
    "token_file": Key(_token_file, None),
    "token": Key(_inline_token, None),
    "tenants": Key(_name_list, missing="is required; list the tenants this client may read"),
}


def _proxy_client(raw: Any, path: str, tenants: Mapping[str, int], ctx: _Context,
                  warn_inline: bool) -> tuple[ProxyClient, list[str]]:
    if not isinstance(raw, Mapping):
        raise ConfigError(path, "must be a mapping with a name, a token source and tenants, "
                                f"got {_kind(raw)}")
    own = _parse_section(raw, path, PROXY_CLIENT_KEYS, ctx)
    for index, name in enumerate(own["tenants"][0]):
        if name not in tenants:
            raise ConfigError(f"{path}.tenants[{index}]", f"{name} is not a configured tenant; the tenants "
                                                          f"are {', '.join(tenants)}")
    source, key_path = _token_source(own, path)
    token = source.read(key_path, ctx.environ)
    warnings = _source_warnings(source, key_path, warn_inline)
    if len(token.reveal()) < PROXY_TOKEN_MIN_CHARS:
        warnings.append(f"{key_path}: the token is shorter than {PROXY_TOKEN_MIN_CHARS} characters; use a "
                        "long random one (e.g. openssl rand -hex 32)")
    if token.reveal().startswith(TOKEN_PREFIX):
        warnings.append(f"{key_path}: the token starts with {TOKEN_PREFIX} like an Exlogare token; a proxy "
                        "client's token is a secret of your own, not an Exlogare token")
    client = ProxyClient(name=own["name"][0], token=token, token_source=source, tenants=own["tenants"][0])
    return client, warnings


def _proxy(raw: Mapping[Any, Any], tenants: Mapping[str, int], ctx: _Context,
           warn_inline: bool) -> tuple[ProxyConfig, list[str]]:
    """The `proxy:` section; client tenant lists must name configured tenants."""
    own = _parse_section(raw, "proxy", PROXY_KEYS, ctx)
    values = {key: own[key][0] if key in own else spec.default for key, spec in PROXY_KEYS.items()}
    if "cache_stale_ttl" not in own:  # the default window, 10m, grows with a longer cache_ttl
        values["cache_stale_ttl"] = max(values["cache_stale_ttl"], values["cache_ttl"])
    elif 0 < values["cache_stale_ttl"] < values["cache_ttl"]:
        raise ConfigError(own["cache_stale_ttl"][1], f"{_fmt_seconds(values['cache_stale_ttl'])} is shorter "
                          f"than cache_ttl ({_fmt_seconds(values['cache_ttl'])}); use 0 to never serve "
                          "stale answers, or at least cache_ttl")
    clients: list[ProxyClient] = []
    warnings: list[str] = []
    for index, item in enumerate(values.pop("clients")):
        path = f"proxy.clients[{index}]"
        client, client_warnings = _proxy_client(item, path, tenants, ctx, warn_inline)
        for other_index, other in enumerate(clients):
            if other.name == client.name:
                raise ConfigError(f"{path}.name", f"{client.name} is already the name of proxy.clients"
                                                  f"[{other_index}]; client names must be unique")
            if other.token == client.token:
                raise ConfigError(f"{path}.{client.token_source.key}", f"the same token as proxy.clients"
                                  f"[{other_index}]; give each client its own token")
        clients.append(client)
        warnings.extend(client_warnings)
    if values["enabled"] and not clients:
        raise ConfigError("proxy.clients", "is empty; with enabled: true the proxy needs at least one client")
    return ProxyConfig(**values, clients=tuple(clients)), warnings


# --- entry points -------------------------------------------------------------------------------------------

def _build(data: Any, environ: Mapping[str, str] | None, base_dir: str | os.PathLike[str] | None,
           source: str | None, warn_inline: bool = True) -> Config:
    env = os.environ if environ is None else environ
    ctx = _Context(os.path.abspath(base_dir if base_dir is not None else os.getcwd()), env)
    root = source or "config"
    if data is None:
        raise ConfigError(root, "the configuration is empty; it needs at least a tenants list")
    if not isinstance(data, Mapping):
        raise ConfigError(root, f"the top level must be a mapping with the keys {', '.join(TOP_LEVEL_KEYS)}, "
                                f"got {_kind(data)}")
    data = _expand(data, "", env)
    misplaced = {**dict.fromkeys(INHERITED_KEYS, "belongs under defaults: or in a tenant entry, not here"),
                 **dict.fromkeys(TENANT_ONLY_KEYS, "belongs in a tenant entry under tenants:, not here")}
    parsed = _parse_section(data, "", TOP_LEVEL_KEYS, ctx, misplaced=misplaced)
    top = {key: parsed[key][0] if key in parsed else spec.default for key, spec in TOP_LEVEL_KEYS.items()}
    per_tenant = dict.fromkeys(TENANT_ONLY_KEYS, "is set per tenant, not under defaults")
    defaults = _parse_section(top["defaults"], "defaults", INHERITED_KEYS, ctx, per_tenant)
    tenants: list[TenantConfig] = []
    warnings: list[str] = []
    names: dict[str, int] = {}
    for index, raw in enumerate(top["tenants"]):
        tenant, tenant_warnings = _tenant(raw, f"tenants[{index}]", defaults, ctx, warn_inline)
        if tenant.name in names:
            raise ConfigError(f"tenants[{index}].name", f"{tenant.name} is already the name of "
                              f"tenants[{names[tenant.name]}]; tenant names must be unique")
        names[tenant.name] = index
        _check_shared_limit(tenant, index, tenants)
        tenants.append(tenant)
        warnings.extend(tenant_warnings)
    proxy, proxy_warnings = _proxy(top["proxy"], names, ctx, warn_inline)
    warnings.extend(proxy_warnings)
    listen_host, listen_port = top["listen_address"]
    return Config(listen_host=listen_host, listen_port=listen_port, concurrency=top["concurrency"],
                  tenants=tuple(tenants), warnings=tuple(warnings), source=source, proxy=proxy)


def parse_config(data: Any, environ: Mapping[str, str] | None = None,
                 base_dir: str | os.PathLike[str] | None = None, source: str | None = None) -> Config:
    """Validate already-decoded YAML. Relative paths resolve against `base_dir` (default: the cwd)."""
    return _build(data, environ, base_dir, source)


def _at(mark: yaml.Mark | None) -> str:
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"


def _yaml_reason(exc: yaml.MarkedYAMLError) -> str:
    reason = f"{_at(exc.problem_mark or exc.context_mark)}: {exc.problem or exc.context or 'invalid YAML'}"
    if exc.context and exc.problem and exc.context_mark and exc.context_mark != exc.problem_mark:
        reason += f" ({exc.context} at {_at(exc.context_mark)})"
    return reason


def read_yaml(name: str, what: str = "configuration file") -> Any:
    """The decoded YAML of a file, or a `ConfigError` naming the file (and the line, for a syntax error)."""
    try:
        with open(name, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError(name, f"cannot read the {what}: {exc.strerror or 'error'}") from None
    except UnicodeDecodeError:
        raise ConfigError(name, f"the {what} is not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        # Only positions and the parser's words: the YAML snippet it would quote could hold a token.
        raise ConfigError(name, _yaml_reason(exc)) from None
    except yaml.YAMLError:
        raise ConfigError(name, "invalid YAML") from None


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML file; relative `token_file`/`ca_file` paths resolve against its directory."""
    name = os.fspath(path)
    data = read_yaml(name)
    return parse_config(data, environ, os.path.dirname(os.path.abspath(name)), source=name)


def demo_config(base_url: str, tenants: Mapping[str, str], listen: str,
                defaults: Mapping[str, Any] | None = None) -> Config:
    """A config for `--demo`: the given tenants (name -> token) against a local simulator.

    `defaults` takes extra raw `defaults:` keys (e.g. `{"interval": "5s"}`) for a livelier demo.
    """
    data = {
        "listen_address": listen,
        "defaults": {"base_url": base_url, "allow_insecure_http": True, **(defaults or {})},
        "tenants": [{"name": name, "token": token} for name, token in tenants.items()],
    }
    # The inline-token warning is for hand-written files; the demo's tokens are made up on the spot.
    return _build(data, {}, None, None, warn_inline=False)
