"""The shipped monitoring: alert rules in both forms agree, and the rules and the dashboard query
only metrics the service exports."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

MONITORING = Path(__file__).resolve().parents[2] / "k8s" / "monitoring"
EXPORTED = {
    "classifier_predictions_total", "classifier_prediction_score", "classifier_inference_seconds",
    "classifier_preprocess_seconds", "classifier_postprocess_seconds", "classifier_batch_size",
    "classifier_images_total", "classifier_request_errors_total", "classifier_model_info",
    "classifier_model_load_seconds",
}  # fmt: skip


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_operator_rules_equal_the_plain_rules_file():
    plain = yaml.safe_load((MONITORING / "classifier-rules.yaml").read_text())["groups"]
    operator = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == plain
    alerts = {rule["alert"] for group in plain for rule in group["rules"]}
    assert alerts == {
        "ImageClassifierHighErrorRatio",
        "ImageClassifierHighLatency",
        "ImageClassifierScoreDrift",
        "ImageClassifierNoReadyReplicas",
    }


def test_rules_and_dashboard_use_only_exported_metrics():
    from service.metrics import get_metrics

    names = {metric.describe()[0].name for metric in vars(get_metrics()).values()}
    assert {name.removesuffix("_total") for name in EXPORTED} == names
    text = (MONITORING / "classifier-rules.yaml").read_text() + "\n".join(dashboard_queries())
    used = set(re.findall(r"classifier_[a-z_]+", text))
    suffixes = ("_bucket", "_sum", "_count")
    used = {name.removesuffix(next((s for s in suffixes if name.endswith(s)), "")) for name in used}
    assert used <= EXPORTED, used - EXPORTED


def test_dashboard_has_the_panels_operators_need():
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    titles = " | ".join(panel["title"] for panel in dashboard["panels"]).lower()
    for needed in (
        "requests per second",
        "p99",
        "error ratio",
        "by label",
        "score",
        "onnxruntime call",
    ):
        assert needed in titles


def test_dashboard_queries_are_valid_promql(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run 'make test' (it installs Debian's prometheus)")
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {
                        "record": f"dashboard:query{index}",
                        "expr": expr.replace("$__rate_interval", "5m"),
                    }
                    for index, expr in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
