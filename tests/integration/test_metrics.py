"""The service's own Prometheus metrics: right values across two workers, valid exposition format,
and scraped by a real Prometheus server."""

import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from benchmarks.servers import scrape, total
from tests.helpers import bentoml_server, encode_image, free_port

pytestmark = [pytest.mark.slow]


def require_tool(name: str) -> str:
    """Debian's prometheus tools, which `make test` installs: a missing one is a failure."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run 'make test' (it installs Debian's prometheus)")
    return path


@pytest.fixture(scope="module", params=["shipped defaults", "batching on"])
def metrics_server(tiny_run, request):
    """A server of its own, so that only this module's requests are counted, with two API
    workers: once as shipped (each API worker runs the model), once with adaptive batching on,
    so that the counts also cross into the model service's process."""
    batching = "1" if request.param == "batching on" else "0"
    with bentoml_server(tiny_run["folder"], workers=2, BATCHING=batching) as url:
        yield url


@pytest.fixture(scope="module")
def good_image():
    from training.data.sources import load_animals

    return encode_image(load_animals().pixels[0], "PNG")


def send_concurrently(requests: list, workers: int = 6) -> list[int]:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda send: send().status_code, requests))


def test_counters_are_summed_over_all_workers(metrics_server, good_image, offline, outlier_image):
    url = metrics_server

    def good():
        return httpx.post(f"{url}/classify", files={"image": ("a.png", good_image)}, timeout=30)

    def unlike():
        return httpx.post(f"{url}/classify", files={"image": ("x", outlier_image)}, timeout=30)

    bad = {
        "not_an_image": lambda: httpx.post(f"{url}/classify", files={"image": ("a", b"text")}),
        "empty_file": lambda: httpx.post(f"{url}/classify", files={"image": ("a.png", b"")}),
        "top_k_out_of_range": lambda: httpx.post(
            f"{url}/classify", files={"image": ("a.png", good_image)}, data={"top_k": "99"}
        ),
    }
    good_count, bad_counts = 40, {"not_an_image": 3, "empty_file": 2, "top_k_out_of_range": 1}
    unknown_count = 7  # images the detector flags, among the good ones
    requests = [good] * (good_count - unknown_count) + [unlike] * unknown_count
    requests += [bad[code] for code, n in bad_counts.items() for _ in range(n)]
    statuses = send_concurrently(requests)
    assert statuses.count(200) == good_count
    good_is_unknown = offline.classify(offline.preprocess(good_image)[None], 1).predictions
    flagged = unknown_count + int(good_is_unknown.unknown[0]) * (good_count - unknown_count)

    # Several scrapes, answered by whichever worker takes each: all must show the same sums.
    for _ in range(4):
        samples = scrape(url)
        assert total(samples, "classifier_predictions_total") == good_count
        assert total(samples, "classifier_predictions_total", label="unknown") == flagged
        assert total(samples, "classifier_ood_score_ratio_count") == good_count
        assert total(samples, "classifier_ood_score_ratio_bucket", le="1.0") == good_count - flagged
        assert total(samples, "classifier_images_total", endpoint="classify") == good_count
        assert total(samples, "classifier_prediction_score_count") == good_count
        assert total(samples, "classifier_prediction_score_bucket", le="+Inf") == good_count
        assert total(samples, "classifier_preprocess_seconds_count") == good_count
        assert total(samples, "classifier_batch_size_sum") == good_count
        assert total(samples, "classifier_postprocess_seconds_count") == good_count
        assert 1 <= total(samples, "classifier_inference_seconds_count") <= good_count
        for code, count in bad_counts.items():
            assert total(samples, "classifier_request_errors_total", error=code) == count
        assert total(samples, "classifier_request_errors_total") == sum(bad_counts.values())
        assert total(samples, "classifier_model_info") == 1
        # Every request counted once, by endpoint and status code, with its duration; the
        # scrapes themselves are not.
        requests_total = "classifier_requests_total"
        assert total(samples, requests_total, endpoint="classify", code="200") == good_count
        assert total(samples, requests_total, endpoint="classify", code="400") == 3
        assert total(samples, requests_total, endpoint="classify", code="415") == 3
        assert total(samples, requests_total) == good_count + sum(bad_counts.values())
        seconds = "classifier_request_duration_seconds_count"
        assert total(samples, seconds, endpoint="classify") == good_count + sum(bad_counts.values())

    # A second round: the batch endpoint, and the counters move by exactly what was sent.
    batch = [("images", (f"{index}.png", good_image)) for index in range(5)]
    send_concurrently([lambda: httpx.post(f"{url}/classify_batch", files=batch, timeout=30)] * 4)
    samples = scrape(url)
    assert total(samples, "classifier_predictions_total") == good_count + 20
    assert total(samples, "classifier_images_total", endpoint="classify_batch") == 20
    assert total(samples, "classifier_prediction_score_count") == good_count + 20
    assert total(samples, "classifier_batch_size_sum") == good_count + 20
    assert total(samples, "classifier_postprocess_seconds_count") == good_count + 4


def test_promtool_accepts_the_exposition(metrics_server, good_image):
    promtool = require_tool("promtool")
    httpx.post(f"{metrics_server}/classify", files={"image": ("a.png", good_image)})
    exposition = httpx.get(f"{metrics_server}/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, text=True, capture_output=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_real_prometheus_scrapes_the_service(metrics_server, good_image, tmp_path):
    prometheus = require_tool("prometheus")
    target = metrics_server.removeprefix("http://")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: image-classifier\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            expected = total(scrape(metrics_server), "classifier_predictions_total") + 3
            for _ in range(3):
                httpx.post(f"{metrics_server}/classify", files={"image": ("a.png", good_image)})
            query = "sum(classifier_predictions_total)"
            value = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    answer = httpx.get(
                        f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}
                    ).json()
                    result = answer["data"]["result"]
                    value = float(result[0]["value"][1]) if result else None
                except (httpx.HTTPError, KeyError, ValueError):
                    value = None
                if value == expected:
                    break
                time.sleep(1)
            log.seek(0)
            assert value == expected, (
                f"Prometheus answered {value}, expected {expected}\n" + (log.read()[-2000:])
            )
        finally:
            process.terminate()
            process.wait(timeout=30)


def test_shipped_alert_rules_pass_promtool():
    promtool = require_tool("promtool")
    rules = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "classifier-rules.yaml"
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    import yaml

    groups = yaml.safe_load(rules.read_text())["groups"]
    count = sum(len(group["rules"]) for group in groups)  # alerts and recording rules
    assert f"SUCCESS: {count} rules found" in result.stdout
