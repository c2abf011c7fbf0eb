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
    "classifier_model_load_seconds", "classifier_model_swaps_total",
    "classifier_shadow_model_info", "classifier_shadow_predictions_total",
    "classifier_shadow_unknown_total", "classifier_shadow_score", "classifier_shadow_shed_total",
    "classifier_ood_score_ratio",
    "classifier_model_test_accuracy", "classifier_feedback_total",
    "classifier_feedback_replaced_total", "classifier_feedback_new_class_total",
    "classifier_feedback_predictions_total", "classifier_feedback_score_total",
    "classifier_feedback_rejected_total", "classifier_captured_total",
    "classifier_capture_evicted_total", "classifier_capture_evicted_bytes_total",
    "classifier_capture_dropped_total", "classifier_capture_refused_total",
    "classifier_requests_total",
    "classifier_request_duration_seconds", "classifier_feedback_received_total",
    "classifier_feedback_orphaned_total", "classifier_prediction_log_written_total",
    "classifier_prediction_log_dropped_total", "classifier_prediction_log_failures_total",
    "classifier_drift_available", "classifier_drift_window_images", "classifier_drift_p_value",
    "classifier_drift_detected", "classifier_drift_windows_total",
    "classifier_drift_skipped_total", "classifier_drift_check_seconds",
    "classifier_estimated_accuracy",
}  # fmt: skip


def dashboard_queries() -> list[str]:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_operator_rules_equal_the_plain_rules_file():
    plain = yaml.safe_load((MONITORING / "classifier-rules.yaml").read_text())["groups"]
    operator = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert operator["kind"] == "PrometheusRule"
    assert operator["spec"]["groups"] == plain
    alerts = {rule["alert"] for group in plain for rule in group["rules"] if "alert" in rule}
    assert alerts == {
        "ImageClassifierHighErrorRatio",
        "ImageClassifierHighLatency",
        "ImageClassifierScoreDrift",
        "ImageClassifierUnknownInputsRising",
        "ImageClassifierNoReadyReplicas",
        "ImageClassifierLiveAccuracyLow",
        "ImageClassifierEstimatedAccuracyLow",
        "ImageClassifierModelRefused",
        "ImageClassifierInputDrift",
        "ImageClassifierEstimatedAccuracyDrop",
        "ImageClassifierDriftUnavailable",
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
        "live accuracy",
        "live confusion",
        "captured inputs",
        "input drift",
        "estimated accuracy, no labels",
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
                        "expr": expr.replace("$__rate_interval", "5m").replace("$__range", "1h"),
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


def promtool_test(tmp_path, series: dict[str, str], alerts: list[dict]) -> None:
    """Run ``promtool test rules`` on the shipped rules with one-minute samples of ``series``
    and the expected ``alerts`` ({eval_time, alertname, exp_alerts})."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed: run 'make test' (it installs Debian's prometheus)")
    # The shipped rules with their annotations left out: this checks when an alert fires; the
    # annotations' templates are checked by `promtool check rules` (test above).
    groups = yaml.safe_load((MONITORING / "classifier-rules.yaml").read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": groups}))
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": name, "values": values} for name, values in series.items()
                ],
                "alert_rule_test": alerts,
            }
        ],
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test))
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def feedback_series(right: list[tuple], wrong: list[tuple]) -> dict:
    """Counters of labels arriving: ``right`` and ``wrong`` are (per minute, minutes) phases."""

    def counter(phases):
        values, level = [], 0
        for per_minute, minutes in phases:
            values.append(f"{level}+{per_minute}x{minutes}")
            level += per_minute * minutes
        return " ".join(values)

    return {
        'classifier_model_test_accuracy{model="m"}': "0.98x600",
        'classifier_feedback_total{predicted="cat", actual="cat", correct="true"}': counter(right),
        'classifier_feedback_total{predicted="cat", actual="dog", correct="false"}': counter(wrong),
    }


def alert(hours_minutes: str, name: str, firing: bool, severity: str = "warning") -> dict:
    expected = [{"exp_labels": {"severity": severity}}] if firing else []
    return {"eval_time": hours_minutes, "alertname": name, "exp_alerts": expected}


def test_live_accuracy_alert_fires_only_when_feedback_is_sure_it_fell(tmp_path):
    """Labels at 97% right for 5 hours (within 5 points of 98%: quiet), then 80% right: fires
    once enough labels show it; too few labels at 50% never fire."""
    name = "ImageClassifierLiveAccuracyLow"
    series = feedback_series(right=[(97, 300), (80, 300)], wrong=[(3, 300), (20, 300)])
    alerts = [alert("4h", name, False), alert("9h", name, True)]
    promtool_test(tmp_path, series, alerts)
    few = feedback_series(right=[(0, 300), (0, 300)], wrong=[(0, 300), (0, 1)])
    few['classifier_feedback_total{predicted="cat", actual="cat", correct="true"}'] = "0+0.1x600"
    few['classifier_feedback_total{predicted="cat", actual="dog", correct="false"}'] = "0+0.1x600"
    promtool_test(tmp_path, few, [alert("9h", name, False)])


def test_replaced_labels_do_not_count_twice_in_live_accuracy(tmp_path):
    """Every prediction was right; 2 a minute first got a wrong label, then a second, right
    one. Net of the replaced labels the live accuracy is 100% and the alert stays quiet; counted
    twice, the wrong labels would make it 83% and fire."""
    name = "ImageClassifierLiveAccuracyLow"
    series = {
        'classifier_model_test_accuracy{model="m"}': "0.98x600",
        'classifier_feedback_total{predicted="cat", actual="cat", correct="true"}': "0+10x600",
        'classifier_feedback_total{predicted="cat", actual="dog", correct="false"}': "0+2x600",
        'classifier_feedback_replaced_total{predicted="cat", actual="dog", correct="false"}': (
            "0+2x600"
        ),
    }
    promtool_test(tmp_path, series, [alert("9h", name, False)])
    series.pop('classifier_feedback_replaced_total{predicted="cat", actual="dog", correct="false"}')
    promtool_test(tmp_path, series, [alert("9h", name, True)])


def test_estimated_accuracy_alert_follows_the_mean_score(tmp_path):
    name = "ImageClassifierEstimatedAccuracyLow"
    series = {
        'classifier_model_test_accuracy{model="m"}': "0.98x600",
        # 100 images a minute, mean top-1 score 0.97, then 0.80.
        "classifier_prediction_score_count": "0+100x600",
        "classifier_prediction_score_sum": "0+97x300 29100+80x300",
    }
    quiet = {"eval_time": "4h", "alertname": name, "exp_alerts": []}
    firing = {
        "eval_time": "9h",
        "alertname": name,
        "exp_alerts": [{"exp_labels": {"severity": "info"}}],
    }
    promtool_test(tmp_path, series, [quiet, firing])


def test_input_drift_alert_fires_on_most_windows_drifted_not_on_the_false_alarm_rate(tmp_path):
    """Two pods, each checking a window a minute: 5% of them drifted for 2 hours (the false
    alarm rate of windows like the reference: quiet), then 80%. The share over 30 minutes passes
    half 18 minutes after the rise, and the alert fires 15 minutes later."""
    name = "ImageClassifierInputDrift"
    windows = 'classifier_drift_windows_total{{pod="{}", verdict="{}"}}'
    series = {}
    for pod in ("a", "b"):
        series[windows.format(pod, "drift")] = "0+0.05x120 6+0.8x60"
        series[windows.format(pod, "no_drift")] = "0+0.95x120 114+0.2x60"
    alerts = [alert("2h", name, False), alert("2h25m", name, False), alert("3h", name, True)]
    promtool_test(tmp_path, series, alerts)


def test_one_drifted_window_does_not_fire_the_drift_alert(tmp_path):
    """Little traffic: one window checked in an hour, and it was drifted. 100% of the windows,
    but one window is a false alarm 5% of the time: quiet."""
    name = "ImageClassifierInputDrift"
    series = {
        'classifier_drift_windows_total{pod="a", verdict="drift"}': "0x60 1x120",
        'classifier_drift_windows_total{pod="a", verdict="no_drift"}': "0x180",
    }
    promtool_test(tmp_path, series, [alert(at, name, False) for at in ("1h20m", "1h50m")])


def test_estimated_accuracy_drop_alert_follows_the_lowest_atc_estimate(tmp_path):
    """Test accuracy 98%. Pod a's ATC estimate stays at 95%; pod b's is 90% (8 points under:
    quiet) for 2 hours, then 80% (18 points under): fires 30 minutes later. Pod b's mean
    confidence at 50% all along must not count: only method="atc" does; nor pod c's ATC at 30%,
    left from before it swapped to a model without a drift reference."""
    name = "ImageClassifierEstimatedAccuracyDrop"
    estimate = 'classifier_estimated_accuracy{{pod="{}", method="{}"}}'
    series = {
        'classifier_model_test_accuracy{pod="a"}': "0.98x180",
        'classifier_model_test_accuracy{pod="b"}': "0.98x180",
        'classifier_model_test_accuracy{pod="c"}': "0.98x180",
        'classifier_drift_available{pod="a"}': "1x180",
        'classifier_drift_available{pod="b"}': "1x180",
        'classifier_drift_available{pod="c"}': "0x180",
        estimate.format("c", "atc"): "0.30x180",
        estimate.format("a", "atc"): "0.95x180",
        estimate.format("a", "mean_confidence"): "0.96x180",
        estimate.format("b", "atc"): "0.90x120 0.80x60",
        estimate.format("b", "mean_confidence"): "0.50x180",
    }
    alerts = [alert("2h", name, False), alert("2h20m", name, False), alert("3h", name, True)]
    promtool_test(tmp_path, series, alerts)


def test_drift_unavailable_alert_fires_when_no_pod_has_a_reference(tmp_path):
    """Pod a serves an old model (no drift reference) all along; pod b's has one for an hour,
    then swaps to an old one too. Quiet while any pod has one, fires an hour after none has."""
    name = "ImageClassifierDriftUnavailable"
    series = {
        'classifier_drift_available{pod="a"}': "0x180",
        'classifier_drift_available{pod="b"}': "1x60 0x120",
    }
    alerts = [
        alert("50m", name, False, "info"),
        alert("1h50m", name, False, "info"),
        alert("2h30m", name, True, "info"),
    ]
    promtool_test(tmp_path, series, alerts)
