"""The `--web.config.file`: TLS and basic auth for every endpoint, as prometheus/exporter-toolkit spells it.

```yaml
tls_server_config:
  cert_file: server.crt            # relative paths resolve against this file's directory
  key_file: server.key
  min_version: TLS12               # or TLS13
  client_auth_type: RequireAndVerifyClientCert   # optional; needs client_ca_file
  client_ca_file: clients-ca.crt
basic_auth_users:
  prometheus: $2y$10$...           # bcrypt hashes: htpasswd -nBC 10 "" | tr -d ':\\n'
unauthenticated_paths: [/healthz, /readyz]   # this exporter's addition: open without basic auth
```

Everything is checked at load time (the certificate and key are loaded into an `ssl.SSLContext`), so a bad
file is refused at start-up, by `--check-config` and on SIGHUP, with the key path in the message. Nothing
from the file is ever echoed in a message: a pasted password must not reach a log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import ssl
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from .config import ConfigError, _kind, read_yaml

TLS_VERSIONS = {"TLS12": ssl.TLSVersion.TLSv1_2, "TLS13": ssl.TLSVersion.TLSv1_3}
# exporter-toolkit's client_auth_type values that Python's ssl module can honour. Go's RequestClientCert and
# RequireAnyClientCert accept unverified certificates, which OpenSSL through Python cannot do.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
_UNSUPPORTED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
_BCRYPT = re.compile(r"\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}")
_TLS_KEYS = ("cert_file", "key_file", "min_version", "max_version", "client_auth_type", "client_ca_file")
_TOP_KEYS = ("tls_server_config", "basic_auth_users", "unauthenticated_paths")
_AUTH_CACHE_SIZE = 256
REALM = "exlogare-exporter"


@dataclass(frozen=True)
class TLSSettings:
    """The resolved `tls_server_config`; `context()` builds a fresh server context from the files."""

    cert_file: str
    key_file: str
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = TLS_VERSIONS[self.min_version]
        ctx.maximum_version = TLS_VERSIONS[self.max_version]
        ctx.load_cert_chain(self.cert_file, self.key_file)
        ctx.verify_mode = CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file:
            ctx.load_verify_locations(cafile=self.client_ca_file)
        return ctx


@dataclass(frozen=True)
class WebConfig:
    """Who may reach the HTTP endpoints and how: `tls` None serves plain HTTP, no users means no auth."""

    tls: TLSSettings | None = None
    users: Mapping[str, bytes] = field(default_factory=dict)  # user -> bcrypt hash
    open_paths: frozenset[str] = frozenset()
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def needs_auth(self, path: str) -> bool:
        """An entry ending in `/` opens everything below it (e.g. `/proxy/`, which checks its own tokens)."""
        if not self.users or path in self.open_paths:
            return False
        return not any(p.endswith("/") and path.startswith(p) for p in self.open_paths)


# --- loading -----------------------------------------------------------------------------------------------

def _mapping(value: Any, path: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, f"must be a mapping, got {_kind(value)}")
    for key in value:
        if key not in keys:
            shown = key if isinstance(key, str) and len(key) <= 40 else "(a key)"
            raise ConfigError(f"{path}.{shown}" if path else str(shown),
                              f"unknown or unsupported key; allowed here: {', '.join(keys)}")
    return value


def _file(value: Any, path: str, base_dir: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(path, f"must be a file path, got {_kind(value)}")
    resolved = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value.strip())))
    if not os.path.isfile(resolved) or not os.access(resolved, os.R_OK):
        raise ConfigError(path, f"{resolved} is not a readable file")
    return resolved


def _choice(value: Any, path: str, allowed: Mapping[str, Any], default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or value not in allowed:
        shown = repr(value) if isinstance(value, str) and len(value) <= 40 else _kind(value)
        raise ConfigError(path, f"{shown} is not one of {', '.join(allowed)}")
    return value


def _tls(raw: Any, base_dir: str) -> TLSSettings | None:
    section = "tls_server_config"
    data = _mapping(raw, section, _TLS_KEYS)
    if not data:
        return None
    for key in ("cert_file", "key_file"):
        if key not in data:
            raise ConfigError(f"{section}.{key}", "is required when tls_server_config is set")
    auth = data.get("client_auth_type")
    if auth in _UNSUPPORTED_CLIENT_AUTH:
        raise ConfigError(f"{section}.client_auth_type",
                          f"{auth} is not supported (it accepts certificates nobody verified); use "
                          "VerifyClientCertIfGiven or RequireAndVerifyClientCert with client_ca_file")
    settings = TLSSettings(
        cert_file=_file(data["cert_file"], f"{section}.cert_file", base_dir),
        key_file=_file(data["key_file"], f"{section}.key_file", base_dir),
        min_version=_choice(data.get("min_version"), f"{section}.min_version", TLS_VERSIONS, "TLS12"),
        max_version=_choice(data.get("max_version"), f"{section}.max_version", TLS_VERSIONS, "TLS13"),
        client_auth_type=_choice(auth, f"{section}.client_auth_type", CLIENT_AUTH, "NoClientCert"),
        client_ca_file=(_file(data["client_ca_file"], f"{section}.client_ca_file", base_dir)
                        if data.get("client_ca_file") is not None else None),
    )
    if TLS_VERSIONS[settings.min_version] > TLS_VERSIONS[settings.max_version]:
        raise ConfigError(f"{section}.min_version",
                          f"{settings.min_version} is above max_version {settings.max_version}")
    if settings.client_auth_type != "NoClientCert" and not settings.client_ca_file:
        raise ConfigError(f"{section}.client_ca_file",
                          f"is required with client_auth_type {settings.client_auth_type}")
    if settings.client_auth_type == "NoClientCert" and settings.client_ca_file:
        raise ConfigError(f"{section}.client_auth_type", "client_ca_file is set but client_auth_type is "
                          "NoClientCert; set VerifyClientCertIfGiven or RequireAndVerifyClientCert")
    return settings


def _users(raw: Any) -> dict[str, bytes]:
    section = "basic_auth_users"
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(section, f"must be a mapping of user name to bcrypt hash, got {_kind(raw)}")
    users: dict[str, bytes] = {}
    for index, (user, hashed) in enumerate(raw.items()):
        if not isinstance(user, str) or not user or ":" in user or not user.isprintable():
            raise ConfigError(f"{section}[{index}]", "a user name must be a non-empty string without ':'")
        path = f"{section}.{user}"
        if not isinstance(hashed, str):
            raise ConfigError(path, f"must be a bcrypt hash string, got {_kind(hashed)}")
        match = _BCRYPT.fullmatch(hashed.strip())
        if match is None:
            # Not echoed: this is where someone pastes a plain password by mistake.
            raise ConfigError(path, "is not a bcrypt hash ($2y$10$ followed by 53 characters); make one "
                                    "with htpasswd -nBC 10 \"\" | tr -d ':\\n' and never put the password "
                                    "itself here")
        if not 4 <= int(match[1]) <= 31:
            raise ConfigError(path, f"bcrypt cost {match[1]} is outside 4..31")
        users[user] = hashed.strip().encode()
    return users


def _open_paths(raw: Any) -> frozenset[str]:
    section = "unauthenticated_paths"
    if raw is None:
        return frozenset()
    if not isinstance(raw, list):
        raise ConfigError(section, f"must be a list of paths such as [/healthz, /readyz], got {_kind(raw)}")
    for index, item in enumerate(raw):
        if not isinstance(item, str) or not item.startswith("/"):
            raise ConfigError(f"{section}[{index}]", "must be a path starting with /, such as /healthz")
    return frozenset(raw)


def parse_web_config(data: Any, base_dir: str) -> WebConfig:
    """Validate decoded YAML (relative files resolve against `base_dir`) and build the TLS context."""
    root = _mapping(data, "", _TOP_KEYS)
    tls = _tls(root.get("tls_server_config"), base_dir)
    users = _users(root.get("basic_auth_users"))
    open_paths = _open_paths(root.get("unauthenticated_paths"))
    if open_paths and not users:
        raise ConfigError("unauthenticated_paths", "is set but basic_auth_users is empty, so every path is "
                                                   "open anyway; add users or drop this key")
    context = None
    if tls is not None:
        try:
            context = tls.context()
        except ssl.SSLError as exc:
            raise ConfigError("tls_server_config", f"the certificate, key or CA cannot be used: "
                                                   f"{exc.reason or exc.strerror or 'TLS error'}") from None
        except OSError as exc:
            raise ConfigError("tls_server_config", f"cannot load: {exc.strerror or 'error'}") from None
    return WebConfig(tls=tls, users=users, open_paths=open_paths, ssl_context=context)


def load_web_config(path: str | os.PathLike[str]) -> WebConfig:
    name = os.fspath(path)
    data = read_yaml(name, "web config file")
    try:
        return parse_web_config(data, os.path.dirname(os.path.abspath(name)))
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc.key_path}" if exc.key_path else name, exc.reason) from None


# --- checking requests -------------------------------------------------------------------------------------

def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(user, password) from an `Authorization: Basic …` header, or None if absent or malformed."""
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "basic" or not value.strip():
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


class Authenticator:
    """Checks basic-auth credentials against bcrypt hashes, the way exporter-toolkit does.

    bcrypt is slow on purpose (tens of milliseconds), so checks run one at a time (a flood of wrong passwords
    costs one core, not all of them) and a success is remembered, keyed by a SHA-256 of the password, so a
    scraper that sends the same credentials every 15 seconds pays once. An unknown user is checked against a
    dummy hash, so timing does not tell which user names exist.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users: Mapping[str, bytes] = {}
        self._ok: OrderedDict[tuple[str, bytes, bytes], None] = OrderedDict()
        self._dummy = bcrypt.hashpw(b"exlogare-exporter", bcrypt.gensalt(10))

    def update(self, users: Mapping[str, bytes]) -> None:
        with self._lock:
            if users != self._users:
                self._users = dict(users)
                self._ok.clear()

    def check(self, header: str | None) -> bool:
        creds = parse_basic(header)
        if creds is None:
            return False
        user, password = creds
        secret = password.encode()
        with self._lock:
            hashed = self._users.get(user)
            key = (user, hashed or b"", hashlib.sha256(secret).digest())
            if hashed is not None and key in self._ok:
                self._ok.move_to_end(key)
                return True
            ok = bcrypt.checkpw(secret, hashed or self._dummy) and hashed is not None
            if ok:
                self._ok[key] = None
                if len(self._ok) > _AUTH_CACHE_SIZE:
                    self._ok.popitem(last=False)
            return ok



class AccessControl:
    """The web config in force: basic auth for requests, the SSL context for new TLS connections.

    One object for the life of the process; `update()` (on SIGHUP) swaps what it enforces.
    """

    def __init__(self, web: WebConfig | None = None) -> None:
        self._auth = Authenticator()
        self.web = WebConfig()
        self.update(web or WebConfig())

    def update(self, web: WebConfig) -> None:
        self._auth.update(web.users)
        self.web = web

    def allows(self, path: str, authorization: str | None) -> bool:
        return not self.web.needs_auth(path) or self._auth.check(authorization)

    def ssl_context(self) -> ssl.SSLContext:
        if self.web.ssl_context is None:
            raise RuntimeError("TLS is not configured")
        return self.web.ssl_context
