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
    "classifier_model_load_seconds", "classifier_ood_score_ratio",
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
        "ImageClassifierUnknownInputsRising",
        "ImageClassifierNoReadyReplicas",
    }


def test_rules_and_dashboard_use_only_exported_metrics():
    from service.http.metrics import get_metrics

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
        "unknown inputs",
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


def test_unknown_inputs_alert_fires_on_a_rise_and_not_at_the_usual_level(tmp_path):
    """promtool's rule unit test: 10 images/s, 5% unknown for a day (the usual level), then
    40% unknown. The alert must stay quiet through the first day and fire after the rise."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run 'make test' (it installs Debian's prometheus)")
    minutes = 26 * 60  # 26 hours of one-minute samples: 24 usual, then 2 with the rise
    usual, risen = 24 * 60, 2 * 60
    # Counters growing by 0.5 (unknown) and 9.5 (known) per second, i.e. 30 and 570 per minute;
    # then 240 and 360 per minute.
    unknown = f"0+30x{usual} {30 * usual}+240x{risen}"
    known = f"0+570x{usual} {570 * usual}+360x{risen}"
    series = 'classifier_predictions_total{{model="m", version="1", label="{}"}}'
    groups = yaml.safe_load((MONITORING / "classifier-rules.yaml").read_text())["groups"]
    (rule,) = [
        rule
        for group in groups
        for rule in group["rules"]
        if rule.get("alert") == "ImageClassifierUnknownInputsRising"
    ]
    test = {
        "rule_files": [str(MONITORING / "classifier-rules.yaml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series.format("unknown"), "values": unknown},
                    {"series": series.format("zebra"), "values": known},
                ],
                "alert_rule_test": [
                    {"eval_time": "23h", "alertname": "ImageClassifierUnknownInputsRising"},
                    {
                        "eval_time": f"{minutes - 1}m",
                        "alertname": "ImageClassifierUnknownInputsRising",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning"},
                                "exp_annotations": {
                                    "summary": rule["annotations"]["summary"],
                                    "description": rule["annotations"]["description"].replace(
                                        "{{ $value | humanizePercentage }}", "40%"
                                    ),
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "unknown-alert-test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
