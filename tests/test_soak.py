"""scripts/soak.py for 20 s at concurrency 4 against a real `tandem serve` (SmolLM2) that the
script starts on a free loopback port: the report has its fields, every bad body (each
variant once, on every endpoint it applies to) is refused with a 4xx, and the run ends with
nothing stuck, no 5xx, no dropped connections and /metrics agreeing with the client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "soak.py"
BAD = (
    "bad_malformed",
    "bad_types",
    "bad_unknown_model",
    "bad_content_type",
    "bad_oversized",
    "bad_deep_json",
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory, smollm2_path) -> dict:
    out = tmp_path_factory.mktemp("soak")
    json_out, log = out / "soak.json", out / "server.log"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--seconds",
        "20",
        "--concurrency",
        "4",
        "--interval",
        "10",
        "--warmup-seconds",
        "5",
        "--request-timeout",
        "90",
        "--json-out",
        str(json_out),
        "--server-log",
        str(log),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=480, env=os.environ.copy(), cwd=REPO
    )
    assert proc.returncode in (0, 1), (
        f"soak.py could not run (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
        f"{proc.stderr[-3000:]}\nserver log:\n{log.read_text()[-3000:] if log.exists() else ''}"
    )
    data = json.loads(json_out.read_text())
    data["_stdout"] = proc.stdout
    return data


def test_report_has_its_fields(report):
    for key in (
        "config",
        "server",
        "calibration",
        "intervals",
        "totals",
        "bad_bodies",
        "bad_body_variants",
        "violations",
        "rss",
        "health",
        "metrics",
        "drain",
        "stuck",
        "failures",
        "warnings",
        "ok",
    ):
        assert key in report, key
    assert report["server"]["started_by_script"] is True
    assert report["calibration"]["num_ctx"] > 0
    assert len(report["intervals"]) == 2
    for row in report["intervals"]:
        for key in (
            "requests",
            "outcomes",
            "latency_p50_s",
            "latency_p99_s",
            "ttfb_p50_s",
            "ttft_p99_s",
            "rss_mb_max",
            "health_max_s",
        ):
            assert key in row, key
    totals = report["totals"]
    assert totals["requests"] > 0
    assert totals["outcomes"].get("ok", 0) > 0, totals["outcomes"]
    assert "by_scenario" in totals
    assert report["rss"]["measured"] and report["rss"]["baseline_mb"] > 0
    assert report["metrics"]["available"]
    assert "per interval" in report["_stdout"]


def test_every_bad_body_is_refused_with_a_4xx(report):
    for name in BAD:
        assert name in report["bad_bodies"], f"{name} was not sent"
    wrong = {
        variant: outcomes
        for variant, outcomes in report["bad_body_variants"].items()
        if any(not kind.startswith("4xx") for kind in outcomes)
    }
    assert not wrong, f"bad bodies not refused with a 4xx: {json.dumps(wrong, indent=1)}"


def test_oversized_and_non_json_bodies_get_their_own_status(report):
    """413 for a body over the server's limit (8 MiB by default; the script sends 9 MB),
    415 for a body that is not JSON."""
    variants = report["bad_body_variants"]
    for endpoint in ("/v1/chat/completions", "/api/chat"):
        assert set(variants[f"bad_oversized/9.0 MB {endpoint}"]) == {"4xx:413"}
    for endpoint in ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate"):
        for kind in ("text/plain", "multipart/form-data"):
            assert set(variants[f"bad_content_type/{kind} {endpoint}"]) == {"4xx:415"}


def test_no_5xx_or_dropped_connections(report):
    outcomes = report["totals"]["outcomes"]
    broken = {
        k: n
        for k, n in outcomes.items()
        if k.startswith("5xx") or k in ("conn_error", "stream_error", "truncated", "bad_response")
    }
    assert not broken, f"{broken}; examples: {json.dumps(report['violations'][:10], indent=1)}"


def test_nothing_stuck_and_sigterm_obeyed(report):
    stuck = report["stuck"]
    assert stuck["client_unfinished"] == 0
    assert stuck["drained"], stuck
    assert report["server"]["shutdown"]["sigterm_obeyed"] is True


def test_metrics_agree_with_the_client(report):
    metrics = report["metrics"]
    assert metrics["consistent"], metrics["mismatches"]
