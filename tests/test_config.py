"""Configuration loading: every rule, valid and invalid; errors name their key path; tokens never leak."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from exlogare_exporter.config import (
    INHERITED_KEYS,
    Config,
    ConfigError,
    TenantConfig,
    TokenSource,
    Window,
    demo_config,
    load_config,
    parse_config,
    parse_duration,
    parse_listen_address,
    parse_size,
)
from exlogare_exporter.secrets import Secret

CANARY = "exl_SECRET_canary_123"
ENV = {"TOK": CANARY}
REPO = Path(__file__).resolve().parent.parent


def tenant(**keys: Any) -> dict[str, Any]:
    return {"name": "acme", "token_env": "TOK", **keys}


def parse(data: dict[str, Any], environ: dict[str, str] | None = None, **kwargs: Any) -> Config:
    return parse_config(data, ENV if environ is None else environ, **kwargs)


def one(**keys: Any) -> TenantConfig:
    """The single tenant of a config holding `tenant(**keys)`."""
    return parse({"tenants": [tenant(**keys)]}).tenants[0]


def error(data: Any, environ: dict[str, str] | None = None, **kwargs: Any) -> str:
    """The message of the ConfigError `data` raises; checked never to hold the token."""
    with pytest.raises(ConfigError) as info:
        parse_config(data, ENV if environ is None else environ, **kwargs)
    message = str(info.value)
    assert CANARY not in message
    assert message == f"{info.value.key_path}: {info.value.reason}"
    return message


def tenant_error(**keys: Any) -> str:
    return error({"tenants": [tenant(**keys)]})


# --- parse_duration / parse_size ----------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25), ("1m30s", 90.0),
    ("1h0m5s", 3605.0), ("1.5s", 1.5), (" 45s ", 45.0), ("45", 45.0), (15, 15.0), (2.5, 2.5), (0, 0.0),
])
def test_parse_duration_accepts(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", [
    "30x", "", "m", "30 s", "30m1h", "1s1s", "-5s", "1d", True, None, [1], -5, float("nan"), float("inf"),
])
def test_parse_duration_refuses(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    (1024, 1024), ("512KiB", 512 * 1024), ("10MiB", 10 * 1024**2), ("1MB", 10**6), ("2GB", 2 * 10**9),
    ("1kB", 1000), ("100B", 100), ("1.5KiB", 1536), ("4096", 4096), ("1 GiB", 1024**3),
])
def test_parse_size_accepts(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["10mb", "ten", "1TiB", "MiB", -1, True, 1.5, None])
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# --- a minimal config and the example file ------------------------------------------------------------------

def test_minimal_config_gets_every_default() -> None:
    config = parse({"tenants": [tenant()]})
    assert (config.listen_host, config.listen_port, config.concurrency) == ("0.0.0.0", 10450, 8)
    assert config.warnings == ()
    assert config.source is None
    t = config.tenants[0]
    assert t.name == "acme"
    assert t.base_url == "https://api.exlogare.net"
    assert t.token == Secret(CANARY)
    assert t.token_source == TokenSource("env", "TOK")
    assert (t.interval, t.jitter, t.max_staleness) == (60.0, 6.0, 300.0)
    assert t.windows == (Window("1d", 1), Window("7d", 7), Window("30d", 30))
    assert t.top_windows == t.windows
    assert (t.timeseries_days, t.top_limit, t.retries) == (30, 10, 2)
    assert (t.timeout, t.connect_timeout) == (10.0, 5.0)
    assert t.allow_insecure_http is False
    assert t.ca_file is None
    assert t.label_max_length == 120
    assert t.max_response_bytes == 10 * 1024 * 1024
    assert t.max_requests_per_second == 0.0


def test_example_config_loads() -> None:
    environ = {"EXLOGARE_TOKEN_ACME": "exl_acme_token", "EXLOGARE_TOKEN_LAB": "exl_lab_token"}
    config = load_config(REPO / "config.example.yaml", environ)
    assert config.warnings == ()
    assert config.source == str(REPO / "config.example.yaml")
    assert (config.listen_host, config.listen_port, config.concurrency) == ("0.0.0.0", 10450, 8)
    acme, lab = config.tenants
    assert acme.token.reveal() == "exl_acme_token"
    assert acme.base_url == "https://api.exlogare.net"
    assert [w.label for w in acme.windows] == ["1d", "7d", "30d"]
    assert acme.max_response_bytes == 10 * 1024**2
    assert lab.base_url == "http://exlogare.lab.internal:8080"
    assert lab.interval == 120.0 and lab.jitter == 12.0 and lab.max_staleness == 600.0
    assert [w.days for w in lab.windows] == [7, 30, 365]
    assert [w.days for w in lab.top_windows] == [7, 30]
    assert lab.max_requests_per_second == 5.0


def test_example_config_documents_every_key() -> None:
    text = (REPO / "config.example.yaml").read_text()
    reference = (REPO / "docs" / "configuration.md").read_text()
    for key in [*INHERITED_KEYS, "listen_address", "concurrency", "name", "token_env", "token_file", "token"]:
        assert f"{key}:" in text, key
        assert f"`{key}`" in reference, key


def test_key_table_matches_the_dataclass() -> None:
    fields = {f.name for f in dataclasses.fields(TenantConfig)}
    assert fields == {*INHERITED_KEYS, "name", "token", "token_source"}


def test_configs_are_frozen() -> None:
    config = parse({"tenants": [tenant()]})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.concurrency = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.tenants[0].interval = 1.0  # type: ignore[misc]


# --- inheritance --------------------------------------------------------------------------------------------

def test_tenants_inherit_defaults_and_override_them() -> None:
    config = parse({
        "defaults": {"interval": "30s", "top_limit": 20, "windows": ["7d"]},
        "tenants": [tenant(), tenant(name="b", top_limit=5)],
    })
    a, b = config.tenants
    assert (a.interval, a.top_limit, a.windows) == (30.0, 20, (Window("7d", 7),))
    assert (b.interval, b.top_limit) == (30.0, 5)
    assert a.jitter == 3.0  # derived from the inherited interval


def test_empty_defaults_section_is_fine() -> None:
    assert parse({"defaults": None, "tenants": [tenant()]}).tenants[0].interval == 60.0


def test_error_in_defaults_names_defaults() -> None:
    message = error({"defaults": {"top_limit": 99}, "tenants": [tenant()]})
    assert message.startswith("defaults.top_limit: 99 is outside 1..50")


# --- unknown keys -------------------------------------------------------------------------------------------

def test_unknown_tenant_key_suggests_and_lists() -> None:
    message = tenant_error(intervall="30s")
    assert message.startswith("tenants[0].intervall: unknown key. Did you mean interval?")
    assert "Allowed here: name, token_env, token_file, token, base_url, interval" in message


def test_unknown_key_in_defaults() -> None:
    message = error({"defaults": {"windowz": [1]}, "tenants": [tenant()]})
    assert message.startswith("defaults.windowz: unknown key. Did you mean windows?")
    assert "token_env" not in message.split("Allowed here:")[1]


def test_unknown_top_level_key_without_close_match() -> None:
    message = error({"zzz": 1, "tenants": [tenant()]})
    assert message.startswith("zzz: unknown key. Allowed here: listen_address, concurrency, defaults, "
                              "tenants")
    assert "Did you mean" not in message


def test_tenant_key_at_top_level_says_where_it_belongs() -> None:
    assert error({"interval": "5m", "tenants": [tenant()]}).startswith(
        "interval: belongs under defaults: or in a tenant entry")
    assert error({"token_env": "TOK", "tenants": [tenant()]}).startswith(
        "token_env: belongs in a tenant entry")


def test_tenant_only_key_under_defaults() -> None:
    message = error({"defaults": {"token_env": "TOK"}, "tenants": [tenant()]})
    assert message == "defaults.token_env: is set per tenant, not under defaults"


# --- top-level structure ------------------------------------------------------------------------------------

def test_missing_tenants() -> None:
    assert error({"concurrency": 2}).startswith("tenants: is required")


def test_empty_tenants() -> None:
    assert error({"tenants": []}).startswith("tenants: is empty")


def test_tenants_must_be_a_list() -> None:
    assert error({"tenants": {"name": "acme"}}) == "tenants: must be a list of tenants, got a mapping"


def test_tenant_must_be_a_mapping() -> None:
    assert error({"tenants": [tenant(), "acme"]}).startswith("tenants[1]: must be a mapping")


def test_top_level_must_be_a_mapping() -> None:
    assert error([1, 2], source="x.yaml").startswith("x.yaml: the top level must be a mapping")


def test_empty_config() -> None:
    assert error(None).startswith("config: the configuration is empty")


# --- tenant names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["acme", "A", "9lives", "team_a.prod-1", "a" * 63])
def test_valid_tenant_names(name: str) -> None:
    assert one(name=name).name == name


@pytest.mark.parametrize("name", ["", "-acme", ".acme", "_acme", "ac me", "ac/me", "a" * 64, "acme\n", "é"])
def test_invalid_tenant_names(name: str) -> None:
    assert tenant_error(name=name).startswith("tenants[0].name: ")
    assert "is not a valid tenant name" in tenant_error(name=name)


def test_tenant_name_must_be_a_string() -> None:
    assert tenant_error(name=12) == "tenants[0].name: must be a string, got a whole number"


def test_tenant_name_is_required() -> None:
    message = error({"tenants": [{"token_env": "TOK"}]})
    assert message.startswith("tenants[0].name: is required")


def test_duplicate_names_name_both_indexes() -> None:
    message = error({"tenants": [tenant(), tenant(name="b"), tenant()]})
    assert message.startswith("tenants[2].name: acme is already the name of tenants[0]")


# --- token sources ------------------------------------------------------------------------------------------

def test_token_from_env_is_stripped() -> None:
    config = parse({"tenants": [tenant()]}, {"TOK": f"  {CANARY}\n"})
    assert config.tenants[0].token.reveal() == CANARY


def test_no_token_source() -> None:
    message = error({"tenants": [{"name": "acme"}]})
    assert message == "tenants[0]: no token; set one of token_env, token_file or token"


def test_two_token_sources() -> None:
    message = error({"tenants": [tenant(token=CANARY)]})
    assert message == "tenants[0]: token_env and token are both set; keep exactly one token source"


def test_unset_token_env() -> None:
    message = error({"tenants": [tenant(token_env="EXLOGARE_TOKEN_ACME")]})
    assert message == "tenants[0].token_env: environment variable EXLOGARE_TOKEN_ACME is not set"


@pytest.mark.parametrize("value", ["", "  \n"])
def test_empty_token_env(value: str) -> None:
    message = error({"tenants": [tenant()]}, {"TOK": value})
    assert message == "tenants[0].token_env: environment variable TOK is empty"


def test_token_env_must_be_a_variable_name() -> None:
    assert tenant_error(token_env="not a name").startswith("tenants[0].token_env: must be the name")


def test_token_pasted_into_token_env_is_not_echoed() -> None:
    message = tenant_error(token_env=CANARY)
    assert message.startswith("tenants[0].token_env: this looks like a token")


def test_token_pasted_into_token_file_is_not_echoed() -> None:
    message = error({"tenants": [{"name": "a", "token_file": CANARY}]})
    assert message.startswith("tenants[0].token_file: this looks like a token")


def write_secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_token_file_is_read_and_stripped(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "acme.token", f"{CANARY}\n")
    config = parse({"tenants": [{"name": "a", "token_file": str(secret)}]})
    t = config.tenants[0]
    assert t.token.reveal() == CANARY
    assert t.token_source == TokenSource("file", str(secret))
    assert config.warnings == ()


def test_token_source_rereads_the_file(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "acme.token", "exl_first")
    source = parse({"tenants": [{"name": "a", "token_file": str(secret)}]}).tenants[0].token_source
    secret.write_text("exl_second\n")
    assert source.read("tenants[0].token_file").reveal() == "exl_second"
    assert source.key == "token_file"


def test_relative_token_file_resolves_against_the_config_dir(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "secrets").mkdir()
    write_secret(tmp_path / "secrets" / "acme", CANARY)
    config_file = tmp_path / "exporter.yaml"
    config_file.write_text("tenants:\n  - name: acme\n    token_file: secrets/acme\n")
    monkeypatch.chdir("/")
    config = load_config(config_file, {})
    assert config.tenants[0].token.reveal() == CANARY
    assert config.tenants[0].token_source.ref == str(tmp_path / "secrets" / "acme")


def test_missing_token_file(tmp_path: Path) -> None:
    message = error({"tenants": [{"name": "a", "token_file": str(tmp_path / "nope")}]})
    assert message == f"tenants[0].token_file: cannot read {tmp_path / 'nope'}: No such file or directory"


def test_token_file_that_is_a_directory(tmp_path: Path) -> None:
    message = error({"tenants": [{"name": "a", "token_file": str(tmp_path)}]})
    assert message.startswith(f"tenants[0].token_file: cannot read {tmp_path}: ")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_token_file(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "t", CANARY, 0o000)
    message = error({"tenants": [{"name": "a", "token_file": str(secret)}]})
    assert message == f"tenants[0].token_file: cannot read {secret}: Permission denied"


@pytest.mark.parametrize("content", ["", " \n\n"])
def test_empty_token_file(tmp_path: Path, content: str) -> None:
    secret = write_secret(tmp_path / "t", content)
    message = error({"tenants": [{"name": "a", "token_file": str(secret)}]})
    assert message == f"tenants[0].token_file: {secret} is empty"


def test_token_file_with_two_lines_is_refused(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "t", f"{CANARY}\n{CANARY}\n")
    message = error({"tenants": [{"name": "a", "token_file": str(secret)}]})
    assert message.startswith("tenants[0].token_file: the token from ")
    assert "whitespace, control or non-ASCII characters" in message
    message = error({"tenants": [{"name": "a", "token": f"{CANARY}\u2019"}]})
    assert message == ("tenants[0].token: the token from the inline token contains whitespace, control or "
                       "non-ASCII characters")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_group_readable_token_file_warns(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "t", CANARY, 0o640)
    config = parse({"tenants": [{"name": "a", "token_file": str(secret)}]})
    assert config.warnings == (f"tenants[0].token_file: {secret} is readable by group or others (mode 0640); "
                               "chmod 600 it",)


def test_inline_token_warns() -> None:
    config = parse({"tenants": [{"name": "a", "token": CANARY}]})
    assert config.tenants[0].token.reveal() == CANARY
    assert config.tenants[0].token_source.kind == "inline"
    assert len(config.warnings) == 1
    assert config.warnings[0].startswith("tenants[0].token: inline tokens are discouraged")


def test_inline_token_must_be_a_string() -> None:
    message = error({"tenants": [{"name": "a", "token": 12345}]})
    assert message == "tenants[0].token: must be a string, got a whole number"


def test_empty_inline_token() -> None:
    assert error({"tenants": [{"name": "a", "token": "  "}]}) == "tenants[0].token: the inline token is empty"


def test_token_without_exl_prefix_warns_without_the_token() -> None:
    config = parse({"tenants": [tenant(), tenant(name="b", token_env="OTHER")]},
                   {"TOK": CANARY, "OTHER": "session_SECRET_canary_456"})
    assert config.warnings == ("tenants[1]: the token does not start with exl_; Exlogare read tokens do",)
    assert "session_SECRET_canary_456" not in repr(config)


# --- durations ----------------------------------------------------------------------------------------------

def test_duration_keys_accept_every_form() -> None:
    t = one(interval="1h30m", timeout=2.5, connect_timeout="250ms", jitter="0", max_staleness=36000)
    assert (t.interval, t.timeout, t.connect_timeout) == (5400, 2.5, 0.25)
    assert (t.jitter, t.max_staleness) == (0, 36000)


def test_bad_duration_names_the_key() -> None:
    message = tenant_error(interval="5x")
    assert message.startswith("tenants[0].interval: '5x' is not a duration; use 30s, 5m")


def test_duration_of_the_wrong_type() -> None:
    assert tenant_error(timeout=[1]).startswith("tenants[0].timeout: must be a duration")
    assert tenant_error(timeout=True).startswith("tenants[0].timeout: must be a duration")


def test_null_value_names_the_key() -> None:
    assert tenant_error(interval=None).startswith("tenants[0].interval: must be a duration")
    assert "got nothing (null)" in tenant_error(interval=None)


def test_interval_minimum() -> None:
    assert one(interval="5s").interval == 5.0
    assert tenant_error(interval="4s") == "tenants[0].interval: 4s is under 5s, the shortest allowed"


@pytest.mark.parametrize("key", ["timeout", "connect_timeout", "max_staleness"])
def test_positive_durations(key: str) -> None:
    assert tenant_error(**{key: 0}) == f"tenants[0].{key}: must be more than 0s"


def test_jitter_default_is_capped_at_30s() -> None:
    assert one(interval="10s").jitter == 1.0
    assert one(interval="1h").jitter == 30.0


def test_jitter_may_equal_the_interval_but_not_exceed_it() -> None:
    assert one(interval="10s", jitter="10s").jitter == 10.0
    message = error({"defaults": {"jitter": "20s"}, "tenants": [tenant(interval="10s")]})
    assert message.startswith("defaults.jitter: 20s is more than the interval "
                              "(10s, from tenants[0].interval)")


def test_jitter_over_the_default_interval() -> None:
    assert tenant_error(jitter="2m").startswith(
        "tenants[0].jitter: 120s is more than the interval (60s, the default)")


def test_max_staleness_default_and_minimum() -> None:
    assert one(interval="2m").max_staleness == 600.0
    assert one(interval="2m", max_staleness="2m").max_staleness == 120.0
    message = tenant_error(interval="2m", max_staleness="1m")
    assert message.startswith("tenants[0].max_staleness: 60s is shorter than the interval (120s")


# --- windows ------------------------------------------------------------------------------------------------

def test_windows_accept_ints_and_strings_with_the_same_label() -> None:
    t = one(windows=[7, "30d", 90])
    assert t.windows == (Window("7d", 7), Window("30d", 30), Window("90d", 90))
    assert one(windows=["07d"]).windows == (Window("7d", 7),)


def test_duplicate_windows_are_refused() -> None:
    assert tenant_error(windows=["7d", 30, 7]) == (
        "tenants[0].windows[2]: 7d is listed twice (also at tenants[0].windows[0])")


def test_at_least_one_window() -> None:
    assert tenant_error(windows=[]) == "tenants[0].windows: must list at least one window"
    assert tenant_error(top_windows=[]) == "tenants[0].top_windows: must list at least one window"


def test_windows_must_be_a_list() -> None:
    assert tenant_error(windows="7d").startswith("tenants[0].windows: must be a list of windows")


@pytest.mark.parametrize("bad", ["7days", "7D", "w", True, 1.5, None])
def test_bad_window(bad: object) -> None:
    message = tenant_error(windows=["1d", bad])
    assert message.startswith("tenants[0].windows[1]: ")
    assert "is not a window; write it as 7d or 7" in message


def test_window_limits() -> None:
    assert one(windows=[1, 365], top_windows=[180]).windows[-1] == Window("365d", 365)
    assert tenant_error(windows=[0]) == "tenants[0].windows[0]: 0d is under 1 day"
    assert error({"tenants": [tenant(), tenant(name="b", windows=[1, 7, "400d"])]}) == (
        "tenants[1].windows[2]: 400d is over 365 days, the most /stats/overview accepts")


def test_top_windows_limit() -> None:
    message = error({"defaults": {"top_windows": ["200d"]}, "tenants": [tenant()]})
    assert message == ("defaults.top_windows[0]: 200d is over 180 days, "
                       "the most /stats/top-projects and /stats/top-root-causes accept")


def test_long_windows_without_top_windows_say_to_set_top_windows() -> None:
    message = error({"defaults": {"windows": [7, "200d"]}, "tenants": [tenant()]})
    assert message.startswith("defaults.windows[1]: 200d is over 180 days, the most /stats/top-projects and "
                              "/stats/top-root-causes accept")
    assert "set top_windows" in message


def test_top_windows_default_to_windows_and_can_differ() -> None:
    assert one(windows=[3]).top_windows == (Window("3d", 3),)
    t = one(windows=[7, 365], top_windows=[7, 180])
    assert [w.days for w in t.top_windows] == [7, 180]


# --- types and ranges ---------------------------------------------------------------------------------------

def test_string_where_an_int_belongs_names_the_key() -> None:
    assert tenant_error(top_limit="10") == ("tenants[0].top_limit: must be a whole number from 1 to 50, "
                                            "got a string; write the number without quotes")


@pytest.mark.parametrize("bad", [10.0, True, None, [10]])
def test_int_keys_refuse_other_types(bad: object) -> None:
    message = tenant_error(retries=bad)
    assert message.startswith("tenants[0].retries: must be a whole number from 0 to 10, got ")


@pytest.mark.parametrize(("key", "low", "high"), [
    ("timeseries_days", 1, 180), ("top_limit", 1, 50), ("retries", 0, 10), ("label_max_length", 16, 1024),
])
def test_int_ranges(key: str, low: int, high: int) -> None:
    assert getattr(one(**{key: low}), key) == low
    assert getattr(one(**{key: high}), key) == high
    for bad in (low - 1, high + 1):
        assert tenant_error(**{key: bad}).startswith(f"tenants[0].{key}: {bad} is outside {low}..{high}")


def test_timeseries_limit_explains_why() -> None:
    assert tenant_error(timeseries_days=181) == ("tenants[0].timeseries_days: 181 is outside 1..180 "
                                                 "(180 is the most /stats/timeseries accepts)")


def test_concurrency_range() -> None:
    assert parse({"concurrency": 256, "tenants": [tenant()]}).concurrency == 256
    assert error({"concurrency": 0, "tenants": [tenant()]}).startswith("concurrency: 0 is outside 1..256")
    assert error({"concurrency": 257, "tenants": [tenant()]}).startswith("concurrency: 257 is outside 1..256")
    assert error({"concurrency": "8", "tenants": [tenant()]}).startswith(
        "concurrency: must be a whole number")


@pytest.mark.parametrize("bad", ["true", "yes", 1, 0, None])
def test_booleans_must_be_yaml_booleans(bad: object) -> None:
    message = tenant_error(allow_insecure_http=bad)
    assert message.startswith("tenants[0].allow_insecure_http: must be true or false, got ")


def test_max_response_bytes() -> None:
    assert one(max_response_bytes="512KiB").max_response_bytes == 512 * 1024
    assert one(max_response_bytes=2048).max_response_bytes == 2048
    assert tenant_error(max_response_bytes="100B") == (
        "tenants[0].max_response_bytes: 100B is outside 1KiB..1GiB")
    assert tenant_error(max_response_bytes="lots").startswith(
        "tenants[0].max_response_bytes: 'lots' is not a size")


def test_max_requests_per_second() -> None:
    assert one(max_requests_per_second=0.5).max_requests_per_second == 0.5
    assert one(max_requests_per_second=3).max_requests_per_second == 3.0
    for bad in (-1, float("inf"), float("nan")):
        assert tenant_error(max_requests_per_second=bad).startswith("tenants[0].max_requests_per_second: ")
    assert tenant_error(max_requests_per_second="fast") == (
        "tenants[0].max_requests_per_second: must be a number (0 = unlimited), got a string")


# --- base_url -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "expected"), [
    ("https://api.exlogare.net", "https://api.exlogare.net"),
    ("https://api.exlogare.net/", "https://api.exlogare.net"),
    ("https://api.exlogare.net/api/v1", "https://api.exlogare.net"),
    ("https://api.exlogare.net/api/v1/", "https://api.exlogare.net"),
    ("https://example.org:8443/exlogare/api/v1", "https://example.org:8443/exlogare"),
    ("HTTPS://example.org/", "https://example.org"),
    ("http://localhost:8080", "http://localhost:8080"),
    ("http://127.0.0.5:8080/", "http://127.0.0.5:8080"),
    ("http://[::1]:8080/api/v1", "http://[::1]:8080"),
])
def test_base_url_normalised(given: str, expected: str) -> None:
    assert one(base_url=given).base_url == expected


@pytest.mark.parametrize(("given", "reason"), [
    ("ftp://example.org", "must start with https://"),
    ("api.exlogare.net", "must start with https://"),
    ("https://", "has no valid host"),
    ("https://example.org/?x=1", "must not have a query"),
    ("https://example.org/#top", "or a fragment"),
    ("https://example.org:99999", "is not a valid URL"),
    (42, "must be a URL"),
])
def test_bad_base_url(given: object, reason: str) -> None:
    message = tenant_error(base_url=given)
    assert message.startswith("tenants[0].base_url: ")
    assert reason in message


def test_credentials_in_base_url_are_not_echoed() -> None:
    message = tenant_error(base_url=f"https://user:{CANARY}@example.org")
    assert message.startswith("tenants[0].base_url: must not hold user:password@")


@pytest.mark.parametrize("host", ["exlogare.lab.internal", "10.0.0.5", "[fe80::1]", "localhost.example.org"])
def test_plain_http_to_a_remote_host_is_refused(host: str) -> None:
    message = tenant_error(base_url=f"http://{host}:8080")
    assert message.startswith(f"tenants[0].base_url: http://{host}:8080 is plain HTTP")
    assert "the token would cross the network in clear" in message
    assert "allow_insecure_http: true" in message


def test_plain_http_allowed_by_the_tenant_or_defaults() -> None:
    assert one(base_url="http://lab:8080", allow_insecure_http=True).base_url == "http://lab:8080"
    config = parse({"defaults": {"allow_insecure_http": True}, "tenants": [tenant(base_url="http://lab")]})
    assert config.tenants[0].allow_insecure_http is True


def test_plain_http_in_defaults_names_defaults() -> None:
    message = error({"defaults": {"base_url": "http://lab"}, "tenants": [tenant()]})
    assert message.startswith("defaults.base_url: http://lab is plain HTTP")


# --- ca_file ------------------------------------------------------------------------------------------------

def test_ca_file_resolves_against_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    config_file = tmp_path / "c.yaml"
    config_file.write_text("defaults:\n  ca_file: ca.pem\ntenants:\n  - {name: a, token_env: TOK}\n")
    assert load_config(config_file, ENV).tenants[0].ca_file == str(tmp_path / "ca.pem")


def test_ca_file_must_exist(tmp_path: Path) -> None:
    message = tenant_error(ca_file=str(tmp_path / "missing.pem"))
    assert message == f"tenants[0].ca_file: {tmp_path / 'missing.pem'} does not exist"
    assert tenant_error(ca_file=str(tmp_path)) == f"tenants[0].ca_file: {tmp_path} is not a readable file"


def test_ca_file_relative_to_base_dir(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    config = parse({"tenants": [tenant(ca_file="ca.pem")]}, base_dir=tmp_path)
    assert config.tenants[0].ca_file == str(tmp_path / "ca.pem")


# --- ${VAR} expansion ---------------------------------------------------------------------------------------

def test_env_expansion_in_any_string_value() -> None:
    environ = {**ENV, "HOST": "exlogare.example.org", "EVERY": "30s", "W": "90d"}
    config = parse({"defaults": {"base_url": "https://${HOST}/api/v1", "interval": "${EVERY}"},
                    "tenants": [tenant(windows=["7d", "${W}"])]}, environ)
    t = config.tenants[0]
    assert (t.base_url, t.interval, t.windows[1]) == ("https://exlogare.example.org", 30.0, Window("90d", 90))


def test_escaped_dollar_brace_is_literal() -> None:
    # Seen after expansion, a literal ${ is validated like any other text: here an invalid tenant name.
    assert tenant_error(name="a$${X}").startswith("tenants[0].name: 'a${X}' is not a valid tenant name")


def test_unset_variable_names_the_key_and_the_variable() -> None:
    message = error({"defaults": {"base_url": "https://${NOPE}"}, "tenants": [tenant()]})
    assert message == "defaults.base_url: environment variable NOPE is not set (used as ${NOPE})"
    message = error({"tenants": [tenant(windows=["1d", "${W}"])]})
    assert message == "tenants[0].windows[1]: environment variable W is not set (used as ${W})"


def test_malformed_references() -> None:
    assert tenant_error(base_url="https://${HOST").startswith("tenants[0].base_url: has an unterminated ${")
    assert tenant_error(base_url="https://${1x}").startswith("tenants[0].base_url: has a ${...} that is not")


def test_expansion_happens_before_validation() -> None:
    message = error({"tenants": [tenant(interval="${I}")]}, {**ENV, "I": "soon"})
    assert message.startswith("tenants[0].interval: 'soon' is not a duration")


def test_inline_token_from_a_variable() -> None:
    config = parse({"tenants": [{"name": "a", "token": "${TOK}"}]})
    assert config.tenants[0].token.reveal() == CANARY
    assert CANARY not in repr(config)


# --- listen_address -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "host", "port"), [
    ("0.0.0.0:10450", "0.0.0.0", 10450), ("[::]:10450", "::", 10450), (":10450", "0.0.0.0", 10450),
    ("127.0.0.1:1", "127.0.0.1", 1), ("localhost:65535", "localhost", 65535), ("[::1]:9000", "::1", 9000),
])
def test_listen_address(given: str, host: str, port: int) -> None:
    config = parse({"listen_address": given, "tenants": [tenant()]})
    assert (config.listen_host, config.listen_port) == (host, port)


@pytest.mark.parametrize(("given", "reason"), [
    ("10450", "is not host:port"), (":::10450", "is not host:port"), ("host:", "is not host:port"),
    ("host:0", "port 0 is outside 1..65535"), ("host:70000", "port 70000 is outside 1..65535"),
    ("[zz]:80", "is not an IPv6 address"), (10450, "must be host:port, got a whole number"),
])
def test_bad_listen_address(given: object, reason: str) -> None:
    message = error({"listen_address": given, "tenants": [tenant()]})
    assert message.startswith("listen_address: ")
    assert reason in message


def test_parse_listen_address_alone() -> None:
    assert parse_listen_address(" [::1]:80 ") == ("::1", 80)
    with pytest.raises(ValueError, match="is not host:port"):
        parse_listen_address("nope")


# --- files --------------------------------------------------------------------------------------------------

def test_yaml_syntax_error_gives_file_line_and_column_but_no_snippet(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(f'tenants:\n  - name: acme\n    token: "{CANARY}\n    interval: [1\n')
    with pytest.raises(ConfigError) as info:
        load_config(config_file, {})
    message = str(info.value)
    assert message == (f"{config_file}: line 5, column 1: found unexpected end of stream "
                       "(while scanning a quoted scalar at line 3, column 12)")
    assert CANARY not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_yaml_error_position(tmp_path: Path) -> None:
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("tenants:\n  - name: acme\n   bad: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line 3, column 4: expected <block end>"):
        load_config(config_file, {})


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    config_file = tmp_path / "empty.yaml"
    config_file.write_text(text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: the configuration is empty"):
        load_config(config_file, {})


def test_non_mapping_file(tmp_path: Path) -> None:
    config_file = tmp_path / "list.yaml"
    config_file.write_text("- name: acme\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: the top level must be a mapping .* got a list"):
        load_config(config_file, {})


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the configuration file: No such file"):
        load_config(tmp_path / "nope.yaml", {})


def test_unsafe_yaml_tags_are_refused(tmp_path: Path) -> None:
    config_file = tmp_path / "evil.yaml"
    config_file.write_text("tenants: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml: line 1, column 10: "):
        load_config(config_file, {})


def test_load_config_uses_os_environ_by_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXLOGARE_TEST_TOKEN", CANARY)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("tenants:\n  - name: acme\n    token_env: EXLOGARE_TEST_TOKEN\n")
    assert load_config(str(config_file)).tenants[0].token.reveal() == CANARY


# --- demo ---------------------------------------------------------------------------------------------------

def test_demo_config() -> None:
    config = demo_config("http://127.0.0.1:18080", {"acme": "exl_demo_acme", "lab": "exl_demo_lab"},
                         "127.0.0.1:10450", defaults={"interval": "5s"})
    assert config.warnings == ()
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 10450)
    assert [t.name for t in config.tenants] == ["acme", "lab"]
    assert config.tenants[1].token.reveal() == "exl_demo_lab"
    assert config.tenants[0].base_url == "http://127.0.0.1:18080"
    assert config.tenants[0].interval == 5.0


def test_demo_config_validates() -> None:
    with pytest.raises(ConfigError, match="tenants"):
        demo_config("http://127.0.0.1:1", {"bad name": "exl_x"}, "127.0.0.1:10450")


# --- the token never leaks ----------------------------------------------------------------------------------

def test_repr_never_shows_the_token(tmp_path: Path) -> None:
    secret = write_secret(tmp_path / "t", CANARY)
    config = parse({"tenants": [tenant(), {"name": "b", "token": CANARY},
                                {"name": "c", "token_file": str(secret)}]})
    assert [t.token.reveal() for t in config.tenants] == [CANARY] * 3
    texts = [repr(config), str(config), *map(repr, config.tenants),
             *(repr(t.token_source) for t in config.tenants), *config.warnings]
    assert "Secret('***')" in repr(config)
    for text in texts:
        assert CANARY not in text


def test_no_error_shows_the_token(tmp_path: Path) -> None:
    """Every way a config can fail next to a real token: the message never holds it."""
    secret = write_secret(tmp_path / "t", CANARY)
    broken = [
        tenant(interval="1x"), tenant(windows=[999]), tenant(base_url="http://remote"),
        tenant(name="bad name"),
        tenant(token_file=str(secret)), {"name": "a", "token": CANARY, "top_limit": "x"},
        {"name": "a", "token": [CANARY]}, {"name": "a", "token": {CANARY: 1}}, {"name": "a", CANARY: 1},
        {"name": "a", "token": f"{CANARY} {CANARY}"}, {"name": "a", "token_env": "${TOK}"},
        {"name": "a", "token_file": "${TOK}"}, {"name": "a", CANARY: "${UNSET}"},
    ]
    for item in broken:
        message = error({"tenants": [item]})  # error() asserts the canary is absent
        assert message.startswith("tenants[0]")


def test_config_error_carries_path_and_reason() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"tenants": [tenant(retries=11)]})
    assert info.value.key_path == "tenants[0].retries"
    assert info.value.reason.startswith("11 is outside 0..10")


def test_config_error_from_a_built_message_and_pickling() -> None:
    import pickle

    exc = ConfigError("--listen: port 0 is outside 1..65535")
    assert (exc.key_path, exc.reason) == ("--listen", "port 0 is outside 1..65535")
    copy = pickle.loads(pickle.dumps(ConfigError("tenants[0].retries", "11 is outside 0..10")))
    assert str(copy) == "tenants[0].retries: 11 is outside 0..10"
    assert copy.key_path == "tenants[0].retries"
