"""Seeded fake data: projects, root causes and months of failure history for one tenant.

Pure functions of a `random.Random`, so the same seed always builds the same tenant. Times are integer
microseconds since the epoch (UTC): exact, cheap to compare and to bisect.
"""

from __future__ import annotations

import itertools
import random
import zlib
from bisect import bisect_right
from datetime import date
from typing import Any, NamedTuple

from ..apirules import EPOCH, US_PER_DAY, US_PER_SECOND, iso

SOURCES = ("gitlab_webhook", "github_app", "generic")
_EPOCH_ORDINAL = EPOCH.date().toordinal()
CLUSTER_CHARS = 120


def day_name(day: int) -> str:
    """`YYYY-MM-DD` of a day counted from the epoch."""
    return date.fromordinal(_EPOCH_ORDINAL + day).isoformat()


def cluster_key(root_cause: str, severity: str) -> tuple[str, str]:
    return root_cause[:CLUSTER_CHARS].strip().lower(), severity


class Project(NamedTuple):
    id: str | None
    path: str | None
    source: str | None
    weight: int


class Failure(NamedTuple):
    us: int
    project_id: str | None
    project_path: str | None
    source: str | None
    has_rca: bool


class Rca:
    """A stored RCA: the JSON item plus what the stats need, precomputed once."""

    __slots__ = ("cluster", "data", "id", "project_id", "project_path", "root_cause", "severity", "source",
                 "ttr", "us")

    def __init__(self, us: int, ttr: float, data: dict[str, Any]) -> None:
        self.us = us
        self.id: str = data["id"]
        self.ttr = ttr
        self.severity: str = data["severity"]
        self.root_cause: str = data["root_cause"]
        self.project_id: str | None = data["project_id"]
        self.project_path: str | None = data["project_path"]
        self.source: str | None = data["source"]
        self.cluster = cluster_key(self.root_cause, self.severity)
        self.data = data

    @property
    def key(self) -> tuple[int, str]:
        return self.us, self.id


_LONG_HEAD = ("Dependency resolution failed while installing the Python requirements: acme-sdk 4.2.1 pins "
              "requests<2.30, and this conflicts with ")
_TRACE = "Traceback (most recent call last):\n" + "".join(
    f'  File "/builds/app/src/module_{i}.py", line {10 * i + 3}, in handler_{i}\n    return next_step(ctx)\n'
    for i in range(40)
) + "RecursionError: maximum recursion depth exceeded while calling a Python object"

# (root_cause, severity, weight, explanation, fix_suggestion). The entries exercise every clustering edge:
# case-only variants (same and different severity), one text with two severities, texts that differ only
# past character 120, padding that trims away, Unicode, quotes, backslashes, newlines, empty, very long.
CATALOG: tuple[tuple[str, str, int, str, str], ...] = (
    ("Connection refused: postgres:5432", "high", 10,
     "The test stage could not reach the database service; the container was not ready yet.",
     "Add a health check to the postgres service and wait for it before running the tests."),
    ("connection refused: POSTGRES:5432", "high", 2,
     "The database service refused connections while the job started.",
     "Wait for the service with `pg_isready -h postgres` before the test step."),
    ("Connection Refused: Postgres:5432", "medium", 2,
     "A retry succeeded later, so the impact was limited, but the first attempt hit a cold database.",
     "Increase the service start-up timeout."),
    ("Flaky test: test_checkout_timeout exceeded 30s", "medium", 6,
     "The test depends on wall-clock timing and fails under load.",
     "Mock the clock in test_checkout_timeout or raise its timeout."),
    ("Flaky test: test_checkout_timeout exceeded 30s", "low", 4,
     "Same flaky test; it passed on retry, so this is low impact.",
     "Quarantine the test until it is fixed."),
    (_LONG_HEAD + "the lock file's requests==2.31.0 (required by the API client)", "medium", 3,
     "Two requirements disagree about the requests version.",
     "Relax the pin in acme-sdk or upgrade it to 4.3."),
    (_LONG_HEAD + "urllib3>=2 required by botocore 1.34 (pulled in by the uploader)", "medium", 3,
     "Two requirements disagree about transitive versions.",
     "Regenerate the lock file with `pip-compile --upgrade`."),
    ("Échec de la compilation : symbole introuvable « Größe » — 构建失败 🚨", "high", 2,
     "Le compilateur ne trouve pas le symbole « Größe » ; "
     "l'encodage du fichier source a changé (UTF-8 → Latin-1).",
     "Ré-enregistrez le fichier en UTF-8 ✅"),
    ('File not found: "C:\\build\\out\\app.exe" (path had \'quotes\' and a trailing \\)', "low", 2,
     'The Windows runner looked for "C:\\build\\out\\app.exe" but the build wrote to C:\\build\\bin.',
     'Set OUTPUT_DIR="C:\\build\\out" in the job variables.'),
    ("AssertionError in test_totals:\nexpected 42\nbut got 41", "medium", 3,
     "An off-by-one error in the totals calculation:\n\n    assert total == 42\n\nfails with 41.",
     "Include the last line item in the sum (range(n + 1))."),
    ("", "low", 1, "The log held no recognisable error.", "Re-run the job with debug logging enabled."),
    ("   \n\t ", "low", 1, "The log was whitespace only.", "Check the runner's log collection."),
    ("  OOM killed: container exceeded 2Gi memory limit (exit 137)  ", "high", 3,
     "The job's container was killed by the kernel's OOM killer.",
     "Raise the memory limit to 4Gi or reduce test parallelism."),
    ("OOM killed: container exceeded 2Gi memory limit (exit 137)", "high", 2,
     "The runner killed the container for exceeding its memory limit.",
     "Lower the number of parallel workers (pytest -n 2)."),
    (_TRACE, "high", 2,
     "Unbounded recursion in the request handler chain.\n" + "A frame repeats.\n" * 20,
     "Break the cycle between handler_3 and handler_7."),
    ("npm ERR! 404 Not Found - GET https://registry.npmjs.org/@acme%2fui - Not found", "medium", 3,
     "The private package @acme/ui is not on the public registry.",
     "Configure the @acme scope to use the internal registry in .npmrc."),
    ("Docker image pull rate limit reached (toomanyrequests)", "low", 3,
     "Docker Hub's anonymous pull limit was hit by the shared runner.",
     "Authenticate to Docker Hub or use the registry mirror."),
    ("Timeout after 3600s: job exceeded maximum duration", "medium", 2,
     "The end-to-end suite hung waiting for a browser.",
     "Add a per-test timeout and kill the browser on teardown."),
)
_CATALOG_CUM = tuple(itertools.accumulate(entry[2] for entry in CATALOG))


def make_projects(rng: random.Random, tenant: str) -> list[Project]:
    """Busy named projects plus the awkward ones: id without path, path without id, neither."""
    def pid() -> str:
        return str(rng.randint(1000, 999_999))

    return [
        Project(pid(), f"{tenant}/api", "gitlab_webhook", 8),
        Project(pid(), f"{tenant}/web-frontend", "github_app", 5),
        Project(pid(), f"{tenant}/platform/infra/terraform-modules", "gitlab_webhook", 3),
        Project(pid(), f"{tenant}/mobile-app", "github_app", 2),
        Project(pid(), None, "gitlab_webhook", 1),
        Project(None, f"{tenant}/scripts", "generic", 1),
        Project(None, None, "generic", 1),
    ]


def project_id_for(path: str | None) -> str | None:
    """A stable id for a project path the tenant did not know yet."""
    return None if path is None else str(10_000 + zlib.crc32(path.encode()) % 900_000)


def provider_of(source: str | None) -> str:
    return {"gitlab_webhook": "gitlab", "github_app": "github"}.get(source or "", "generic")


_V4_CLEAR = ~((0xF000 << 64) | (0xC000 << 48))
_V4_SET = (0x4000 << 64) | (0x8000 << 48)


def new_id(rng: random.Random) -> str:
    """A random (version 4) UUID from the seeded generator; formatted by hand because it is hot."""
    h = f"{(rng.getrandbits(128) & _V4_CLEAR) | _V4_SET:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def pick(rng: random.Random, items: list[Any] | tuple[Any, ...], cum: list[int] | tuple[int, ...]) -> Any:
    """`rng.choices(items, cum_weights=cum)[0]`, without its per-call overhead."""
    return items[bisect_right(cum, rng.random() * cum[-1])]


def pick_cause(rng: random.Random) -> tuple[str, str, int, str, str]:
    return pick(rng, CATALOG, _CATALOG_CUM)


_EXPLAIN = {cause: (explanation, fix) for cause, _sev, _w, explanation, fix in CATALOG}


def explain(root_cause: str) -> tuple[str, str]:
    """Explanation and fix for a root cause: the catalogue's texts, or a generic pair for custom ones."""
    found = _EXPLAIN.get(root_cause)
    if found is None:
        return f"The job failed with: {root_cause[:200]}", "Inspect the job log around the first error."
    return found


def build_rca(rng: random.Random, *, us: int, run_id: int, root_cause: str, severity: str,
              project_id: str | None, project_path: str | None, source: str | None) -> dict[str, Any]:
    """One RCA item with exactly the contract's fields, URLs consistent with the provider."""
    provider = provider_of(source)
    job_id: str | None = str(run_id * 7 + int(rng.random() * 7))
    web = pipeline = job = None
    if provider == "gitlab" and project_path:
        web = f"https://gitlab.example.com/{project_path}"
        pipeline, job = f"{web}/-/pipelines/{run_id}", f"{web}/-/jobs/{job_id}"
    elif provider == "github" and project_path:
        web = f"https://github.com/{project_path}"
        pipeline, job = f"{web}/actions/runs/{run_id}", f"{web}/actions/runs/{run_id}/job/{job_id}"
    elif provider == "generic" and rng.random() < 0.5:
        job_id = None
    explanation, fix = explain(root_cause)
    return {
        "id": new_id(rng), "provider": provider, "source": source, "ci_run_id": str(run_id),
        "ci_job_id": job_id, "project_id": project_id, "project_path": project_path,
        "project_web_url": web, "pipeline_url": pipeline, "job_url": job,
        "mr_iid": 1 + int(rng.random() * 900) if rng.random() < 0.35 else None,
        "root_cause": root_cause, "explanation": explanation, "fix_suggestion": fix,
        "severity": severity, "confidence": round(rng.uniform(0.35, 0.99), 2), "created_at": iso(us),
    }


def time_to_rca(rng: random.Random) -> float:
    """Mostly seconds, a long tail to minutes."""
    return round(min(rng.lognormvariate(2.6, 0.9), 1800.0), 1)


def generate_history(rng: random.Random, projects: list[Project], now_us: int, *, history_days: int,
                     per_day: float, quiet_days: int, first_run: int) -> tuple[list[Failure], list[Rca]]:
    """Failures as a Poisson stream over the history, some whole days off, most with an RCA.

    Returns failures sorted by time and RCAs sorted by (created_at, id). An RCA that would be written
    after `now_us` is dropped: that failure is still being analysed.
    """
    failures: list[Failure] = []
    rcas: list[Rca] = []
    if history_days <= 0 or per_day <= 0:
        return failures, rcas
    start = now_us - history_days * US_PER_DAY
    end = now_us - quiet_days * US_PER_DAY
    off_days = {d for d in range(start // US_PER_DAY, end // US_PER_DAY + 1) if rng.random() < 0.12}
    cum = list(itertools.accumulate(p.weight for p in projects))
    mean_gap = US_PER_DAY / per_day
    run_id = first_run
    t = start
    while True:
        t += int(rng.expovariate(1.0) * mean_gap) + 1
        if t > end:
            break
        if t // US_PER_DAY in off_days:
            continue
        project = pick(rng, projects, cum)
        created = t + int(time_to_rca(rng) * US_PER_SECOND)
        if rng.random() < 0.1:
            created += -created % US_PER_SECOND  # a whole second: the server then drops the fraction
        has_rca = rng.random() < 0.88 and created <= now_us
        failures.append(Failure(t, project.id, project.path, project.source, has_rca))
        if not has_rca:
            continue
        run_id += 1
        cause, severity, _w, _e, _f = pick_cause(rng)
        data = build_rca(rng, us=created, run_id=run_id, root_cause=cause, severity=severity,
                         project_id=project.id, project_path=project.path, source=project.source)
        rcas.append(Rca(created, (created - t) / US_PER_SECOND, data))
    rcas.sort(key=lambda r: (r.us, r.id))
    return failures, rcas
