"""The alerting rules: promtool's checks and unit tests, and the mixin conventions they follow."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from exlogare_exporter.config import parse_duration
from tests import bundle
from tests.support import ROOT, require_tool

SEVERITIES = {"critical", "warning", "info"}
REQUIRED = {  # the issue's list: every one must exist
    "ExlogareExporterDown", "ExlogareTenantRefreshFailing", "ExlogareTenantTokenRejected",
    "ExlogareTenantRateLimited", "ExlogareTenantDataStale", "ExlogareNewHighSeverityRCAs",
    "ExlogareHighSeveritySurge", "ExlogareSlowRCAs",
}
RUNBOOK_BASE = "https://github.com/exlogare/exlogare-exporter/blob/main/README.md#"
RULES = bundle.alert_rules()
NAMES = [r["alert"] for r in RULES]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=120)


def test_promtool_check_rules_with_fatal_lint() -> None:
    result = promtool("check", "rules", "--lint=all", "--lint-fatal", "prometheus/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rules found" in result.stdout


def test_promtool_unit_tests() -> None:
    result = promtool("test", "rules", "prometheus/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_example_prometheus_config_is_valid_and_loads_the_rules() -> None:
    result = promtool("check", "config", "prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ROOT / "prometheus/prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "exlogare"  # what the alerts' job="exlogare" selects


def test_every_alert_the_issue_asks_for_exists() -> None:
    assert set(NAMES) >= REQUIRED
    assert len(NAMES) == len(set(NAMES))


@pytest.mark.parametrize("rule", RULES, ids=NAMES)
def test_mixin_conventions(rule: dict) -> None:
    assert re.fullmatch(r"Exlogare(?:[A-Z][a-z]+|RCAs?)+", rule["alert"]), "CamelCase with an Exlogare prefix"
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["summary"].endswith(".") and len(annotations["summary"]) < 100
    # At least two evaluations of a stream walk (30s) or a few stats refreshes (60s) before firing.
    assert parse_duration(rule["for"]) >= 120


def test_all_three_severities_are_used() -> None:
    assert {r["labels"]["severity"] for r in RULES} == SEVERITIES


@pytest.mark.parametrize("rule", RULES, ids=NAMES)
def test_runbook_url_points_at_a_readme_section(rule: dict) -> None:
    url = rule["annotations"]["runbook_url"]
    assert url.startswith(RUNBOOK_BASE)
    anchor = url.removeprefix(RUNBOOK_BASE)
    assert anchor == rule["alert"].lower()
    assert anchor in bundle.readme_anchors(), f"README.md has no section for #{anchor}"


def test_readme_documents_every_threshold() -> None:
    text = bundle.README.read_text()
    for rule in RULES:
        section = text.split(f"#### {rule['alert']}", 1)
        assert len(section) == 2, rule["alert"]
        body = section[1].split("\n#", 1)[0]
        assert rule["for"] in body, f"{rule['alert']}: the README gives no `for` of {rule['for']}"


def unit_tests() -> list[dict]:
    return yaml.safe_load(bundle.ALERT_TESTS.read_text())["tests"]


@pytest.mark.parametrize("name", NAMES)
def test_every_alert_has_a_firing_and_a_quiet_case(name: str) -> None:
    cases = [case for test in unit_tests() for case in test.get("alert_rule_test", [])
             if case["alertname"] == name]
    assert any(case["exp_alerts"] for case in cases), f"{name}: no case where it fires"
    assert any(not case["exp_alerts"] for case in cases), f"{name}: no case where it must stay quiet"


def test_readme_links_to_its_own_sections_resolve() -> None:
    """The alerts table, the runbooks and the backfill section link to each other by anchor."""
    links = set(re.findall(r"\]\(#([\w-]+)\)", bundle.README.read_text()))
    assert links >= {"alerts", "history-backfill", "exlogareexporterdown"}
    assert links <= bundle.readme_anchors(), links - bundle.readme_anchors()
