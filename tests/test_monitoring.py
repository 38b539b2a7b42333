"""The dashboard, the alert rules and the drift score: checked by Prometheus' own promtool (Debian package
`prometheus`) and against the one list of metrics in serve/metrics.py. No Ray here: the live metrics are
checked in test_serve_observability.py."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from serve.metrics import ALERTS, METRICS, LabelMix

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus-alerts.yaml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("LABELFUSE_REQUIRE_SYSTEM_TOOLS"):  # CI installs it: missing there is a failure
            pytest.fail("promtool is not installed (Debian package prometheus)")
        pytest.skip("promtool is not installed (apt install prometheus)")
    return path


def test_the_alert_rules_are_valid_prometheus_rules():
    out = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def _alert(name: str) -> dict:
    a = next(a for a in ALERTS if a.name == name)
    return {"exp_labels": {"severity": a.severity}, "exp_annotations": {"summary": a.means, "runbook": a.do}}


def test_the_alerts_fire_on_what_they_watch_and_stay_quiet_otherwise(tmp_path):
    """promtool evaluates the rules over series written here, minute by minute."""
    cases = [
        # label drift: fires after 30 min above 0.25 on any replica, not for a replica at 0.05
        ({"ray_labelfuse_label_drift_psi{replica='a'}": "0.3x60", "ray_labelfuse_label_drift_psi{replica='b'}": "0.05x60"},
         "LabelfuseLabelDrift", [("20m", False), ("40m", True)]),
        ({"ray_labelfuse_label_drift_psi{replica='a'}": "0.05x60"}, "LabelfuseLabelDrift", [("50m", False)]),
        # the budget: $10 left, falling $1 per hour: spent within a day
        ({"ray_labelfuse_llm_budget_left_usd": "10-0.0166667x600"}, "LabelfuseLLMBudgetRunsOut", [("7h", True)]),
        ({"ray_labelfuse_llm_budget_left_usd": "10x600"}, "LabelfuseLLMBudgetRunsOut", [("7h", False)]),
        # a text failing alone in the model over HTTP fires, though no Kafka series exists at all
        ({"ray_labelfuse_texts_refused_total{stage='model'}": "0 0 1 1 1 1"}, "LabelfuseTextsFailAlone",
         [("1m", False), ("4m", True)]),
        # under half the predictions confident: 60 of 100 below 0.5
        ({"ray_labelfuse_confidence_bucket{le='0.5'}": "0+60x120", "ray_labelfuse_confidence_count": "0+100x120"},
         "LabelfuseLowConfidence", [("30m", False), ("2h", True)]),
    ]  # fmt: skip
    tests = []
    for series, name, checks in cases:
        tests.append({
            "interval": "1m",
            "input_series": [{"series": s.replace("'", '"'), "values": v} for s, v in series.items()],
            "alert_rule_test": [
                {"eval_time": t, "alertname": name, "exp_alerts": [_alert(name)] if fires else []} for t, fires in checks
            ],
        })  # fmt: skip
    spec = tmp_path / "alerts-test.yaml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": tests}))
    out = subprocess.run([promtool(), "test", "rules", str(spec)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def _series(text: str) -> set[str]:
    return {re.sub(r"_(bucket|count|sum)$", "", s) for s in re.findall(r"ray_labelfuse_\w+", text)}


def test_the_dashboard_and_the_rules_query_only_metrics_the_app_records():
    known = {m.series for m in METRICS.values()}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert _series("\n".join(exprs)) == known  # every metric has a panel, and no panel queries anything else
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert _series("\n".join(r["expr"] for r in rules)) <= known
    assert {p["title"] for p in dashboard["panels"]} and all(p["targets"] for p in dashboard["panels"])


def test_label_drift_is_zero_for_the_training_mix_and_grows_as_the_mix_moves():
    train = {"business": 0.5, "sport": 0.3, "tech": 0.2}

    def psi(mix: dict[str, int]) -> float | None:
        m = LabelMix(list(train), train, window=1000)
        m.add([{"label": label} for label, n in mix.items() for _ in range(n)])
        return m.psi()

    assert psi({"business": 50, "sport": 30, "tech": 19}) is None  # under 100 predictions: too noisy to say
    assert psi({"business": 500, "sport": 300, "tech": 200}) == pytest.approx(0.0, abs=1e-6)
    small, big = psi({"business": 450, "sport": 330, "tech": 220}), psi({"business": 100, "sport": 100, "tech": 800})
    assert 0 < small < 0.1 < 0.25 < big
    assert psi({"business": 0, "sport": 0, "tech": 1000}) > big  # a class never predicted: large, finite
    window = LabelMix(list(train), train, window=100)
    window.add([{"label": "tech"}] * 100 + [{"labels": ["business", "sport"]}] * 100 + [{"error": "x"}] * 5)
    assert len(window.window) == 100 and window.share() == {"business": 0.5, "sport": 0.5, "tech": 0.0}
    assert LabelMix(list(train), None).psi() is None  # a bundle without training shares: no figure
