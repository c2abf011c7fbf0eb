"""The results of a benchmark run as ratios, a table, a plot, and BENCHMARKS.md."""

from __future__ import annotations

import shutil
from pathlib import Path

from benchmarks.ratios import (
    target_status,
)

ROOT = Path(__file__).resolve().parent.parent


# The page's last section, written by hand: each change's before/after figures, kept across runs.
CHANGES_HEADING = "## Changes, before and after"
# The page above that section, its figures filled in from the run (str.format fields).
PAGE_TEMPLATE = Path(__file__).resolve().parent / "page.md"


def write_report(results: dict, table: str, plot_path: Path) -> None:
    """Rewrite BENCHMARKS.md and its plot in docs/images/ from one run."""
    shutil.copyfile(plot_path, ROOT / "docs" / "images" / "benchmark.png")
    machine = results["machine"]
    shipped = results["shipped_batching"]
    seconds = results["seconds_per_point"]
    text = PAGE_TEMPLATE.read_text().format(
        cpus=machine["cpus"],
        processor=machine["processor"],
        memory_gib=machine["memory_gib"],
        python=machine["python"],
        platform=machine["platform"],
        shipped=shipped,
        seconds=seconds,
        table=table,
    )
    page = ROOT / "BENCHMARKS.md"
    previous = page.read_text() if page.is_file() else ""
    if CHANGES_HEADING in previous:
        text += "\n" + previous[previous.index(CHANGES_HEADING) :]
    page.write_text(text)


HEADER = [
    "| measurement | images/s | p50 ms | p95 ms | p99 ms | server CPU ms/request "
    "| busiest process | mean batch |",
    "| --- | --- | --- | --- | --- | --- | --- | --- |",
]
# The table's sections, each a run's settings and their titles, in order.
SERVICE_MODES = (
    ("service_batching_off", "service, batching off"),
    ("service_batching_on", "service, batching on"),
)
LOOP_TITLES = (
    ("off", "feedback and capture off"),
    ("feedback", "feedback on (every prediction recorded)"),
    ("feedback_capture_hard", "feedback on, CAPTURE=hard (as the overlay deploys it)"),
    ("feedback_capture_all", "feedback on, CAPTURE=sample:1 (every input kept)"),
)
LOG_TITLES = (
    ("off", "prediction log off"),
    ("log_postgres", "prediction log on PostgreSQL (FEEDBACK_TOKEN, DATABASE_URL)"),
)
EXPLAIN_TITLES = {"off": "explain off", "map": "explain=1", "png": "explain=png"}
BASELINES = (
    ("plain_fastapi", "plain FastAPI + uvicorn"),
    ("docs_style", "BentoML docs-style service"),
)


def row(title: str, run: dict) -> str:
    """One load point: its throughput, latencies, server CPU and batching."""
    share = run.get("cpu_share_by_process") or [None]
    return (
        f"| {title} c={run['concurrency']} | {run['images_per_second']} | {run['p50_ms']} | "
        f"{run['p95_ms']} | {run['p99_ms']} | {run.get('server_cpu_ms_per_request', '')} | "
        f"{share[0] if share[0] is not None else ''} | {run.get('mean_batch_size') or ''} |"
    )


def median_row(title: str, figures: dict) -> str:
    """A point measured in interleaved rounds: its medians."""
    return (
        f"| {title} (median of rounds) | {figures['images_per_second']} | {figures['p50_ms']} "
        "| | | | | |"
    )


def limit_rows(results: dict) -> list[str]:
    limit = results["limit"]
    rows = [
        f"| limit, in-process, batch 1 | {limit['batch_1']['images_per_second']} | "
        f"{limit['batch_1']['p50_ms']} | | | | | 1 |",
        f"| limit, in-process, batch 64 | {limit['batch_64']['images_per_second']} | "
        f"{limit['batch_64']['p50_ms']} | | | | | 64 |",
    ]
    for name, figures in results["payload_limits"].items():
        rows += [
            f"| limit, in-process, {name}, one thread | "
            f"{figures['one_thread_images_per_second']} | | | | | | 1 |",
            f"| limit, in-process, {name}, {figures['cores']} processes | "
            f"{figures['all_cores_images_per_second']} | | | | | | 1 |",
        ]
    return rows


def service_rows(results: dict) -> list[str]:
    rows = []
    for key, title in SERVICE_MODES:
        for payload, runs in results[key]["payloads"].items():
            rows += [row(f"{title}, /classify {payload}", run) for run in runs]
        batch = results[key].get("classify_batch")
        if batch:
            rows.append(
                f"| {title}, /classify_batch 64 PNGs c=2 | {batch['images_per_second']} | "
                f"{batch['p50_ms']} | {batch['p95_ms']} | {batch['p99_ms']} | | | |"
            )
    return rows


def loop_rows(results: dict) -> list[str]:
    return [
        median_row(f"service, {title}, /classify {payload} c=8", figures)
        for setting, title in LOOP_TITLES
        for payload, figures in results["loop"][setting].items()
    ]


def prediction_log_rows(results: dict) -> list[str]:
    return [
        median_row(f"service, {title}, /classify {payload} c=8", figures)
        for setting, title in LOG_TITLES
        for payload, figures in results["prediction_log"]["classify"][setting].items()
    ]


def rollout_rows(results: dict) -> list[str]:
    """The shadow on and off (medians of rounds), and the load steady and while swapping."""
    rollout = results["rollout"]
    rows = [
        median_row(
            f"service, {key.replace('_', ' ')}, shadow {setting}, /classify png c=8", figures
        )  # fmt: skip
        for key, pair in rollout["shadow"]["settings"].items()
        for setting, figures in pair.items()
    ]
    swap = rollout["swap"]
    for setting, figures in (("steady", swap["steady"]), ("a swap every second", swap["swapping"])):
        rows.append(
            f"| service, 2 workers, {setting}, /classify png c=8 (longest {figures['max_ms']} ms)"
            f" | {figures['images_per_second']} | {figures['p50_ms']} | | {figures['p99_ms']} "
            "| | | |"
        )
    return rows


def explain_rows(title: str, explain: dict) -> list[str]:
    return [
        median_row(
            f"{title}, /classify {payload} {EXPLAIN_TITLES[mode]} c={level.removeprefix('c')}",
            figures,
        )
        for payload, by_level in explain.items()
        for level, by_mode in by_level.items()
        for mode, figures in by_mode.items()
    ]


def baseline_rows(results: dict) -> list[str]:
    rows = [
        row(f"{title}, {payload}", run)
        for key, title in BASELINES
        for payload, runs in results[key]["payloads"].items()
        for run in runs
    ]
    cli = results["cli"]
    rows += [
        f"| offline CLI, {cli['files']} JPEG photos, {cli['decoders']} decoding processes | "
        f"{cli['images_per_second']} | | | | | | 64 |",
        f"| offline CLI, {cli['files']} JPEG photos, decoding in-process | "
        f"{cli['one_process_images_per_second']} | | | | | | 64 |",
    ]
    return rows + [
        row("naive Keras service, /classify png multipart", run)
        for run in results["naive_keras"]["classify"]
    ]


def backbone_name(results: dict) -> str:
    training = results["backbone"]["training"]
    return f"{training['backbone']} {training['image_size']}x{training['image_size']}"


def backbone_rows(results: dict) -> list[str]:
    backbone, name = results["backbone"], backbone_name(results)
    rows = []
    for key, figures in backbone["onnxruntime"].items():
        threads, batch = key.removeprefix("threads_").split("_batch_")
        rows.append(
            f"| {name}, onnxruntime alone, batch {batch}, {threads} thread(s) | "
            f"{figures['images_per_second']} | {figures['p50_ms']} | | | | | {batch} |"
        )
    for payload, figures in backbone["payload_limits"].items():
        rows.append(
            f"| {name}, {payload} decode + preprocess + onnxruntime, no HTTP, all "
            f"{figures['cores']} cores | {figures['all_cores_images_per_second']} | | | | | | 1 |"
        )
    for mode in ("off", "on"):
        for payload, runs in backbone[f"service_batching_{mode}"]["payloads"].items():
            rows += [
                row(f"{name} service, batching {mode}, /classify {payload}", run) for run in runs
            ]
    for payload, runs in backbone["plain_fastapi"]["payloads"].items():
        rows += [row(f"{name} plain FastAPI + uvicorn, {payload}", run) for run in runs]
    return rows + explain_rows(f"{name} service", backbone["explain"])


def ratio_rows(results: dict) -> list[str]:
    return ["", "| ratio | value | target |", "| --- | --- | --- |"] + [
        f"| `{name}` | {value} | {target_status(name, value)} |"
        for name, value in results["ratios"].items()
    ]


def summary_lines(results: dict) -> list[str]:
    """The figures under the table: start-up, memory, size, training, batching, maps, int8."""
    backbone, name = results["backbone"], backbone_name(results)
    shipped = results[f"service_batching_{results['shipped_batching']}"]
    training = backbone["training"]
    footprint = results["footprint"]
    naive_ready = results["naive_keras"]["ready_seconds"]
    return [
        "",
        f"- service ready (launch to /readyz 200): {shipped['ready_seconds']} s (target <= 5 s: "
        f"{'holds' if shipped['ready_seconds'] <= 5 else 'MISSED'}); naive Keras: {naive_ready} s",
        f"- resident memory per process of the service: {shipped['rss_mib_per_process']} MiB",
        f"- installed size: serving {footprint['serving_mib']} MiB, training "
        f"{footprint['training_mib']} MiB, ratio {footprint['serving_over_training']} "
        f"(target < 0.25: {'holds' if footprint['serving_over_training'] < 0.25 else 'MISSED'})",
        f"- training: tf.data pipeline {results['training']['pipeline_images_per_second']} "
        f"images/s, in-memory fit {results['training']['in_memory_fit_images_per_second']} "
        "images/s",
        f"- decode + preprocess of one PNG: {results['limit']['decode_preprocess_us']} us",
        f"- {name} training on {training['train_images']} photos: phase 1 computed the "
        f"features of {training['phase_1_feature_images']} images once in "
        f"{training['phase_1_feature_seconds']} s "
        f"({training['phase_1_feature_images_per_second']} images/s) and fitted the head for "
        f"{training['phase_1_epochs']} epochs in {training['phase_1_head_fit_seconds']} s (about "
        f"{training['phase_1_uncached_seconds_estimate']} s with a backbone pass per epoch); "
        f"phase 2 fine-tuned at {training['phase_2_train_images_per_second']} images/s over "
        f"{training['phase_2_epochs']} epochs (the first one decodes the photos and traces the "
        "graph)",
        f"- `BATCHING=auto` chose **{results['batching_auto']['chosen']}** for the CNN "
        f"({results['batching_auto']['batch_1_ms']} ms per image, batch-8 cost ratio "
        f"{results['batching_auto']['ratio']}) and **{backbone['batching_auto']['chosen']}** for "
        f"{name} ({backbone['batching_auto']['batch_1_ms']} ms, ratio "
        f"{backbone['batching_auto']['ratio']})",
        cam_cost_line("the CNN", results["cam_cost"]),
        cam_cost_line(name, backbone["cam_cost"]),
        f"- onnxruntime, one thread, batch 1: float32 "
        f"{results['int8'].get('batch_1_us_float32', '-')} us, int8 (`--quantize int8`) "
        f"{results['int8'].get('batch_1_us_int8', '-')} us",
    ]


# The table, section by section.
SECTIONS = (
    limit_rows,
    service_rows,
    loop_rows,
    prediction_log_rows,
    rollout_rows,
    lambda results: explain_rows("service", results["explain"]),
    baseline_rows,
    backbone_rows,
    ratio_rows,
    summary_lines,
)


def format_table(results: dict) -> str:
    return "\n".join(HEADER + [line for section in SECTIONS for line in section(results)])


def cam_cost_line(model: str, cost: dict) -> str:
    """One line of the list: onnxruntime with and without the map, for one model."""
    if "skipped" in cost:
        return f"- class activation map of {model}: {cost['skipped']}"

    def shown(key: str) -> str:
        low, high = cost[key]["spread_us"]
        return f"{cost[key]['median_us']} us ({low}-{high})"

    return (
        f"- class activation map ({cost['cam_shape'][0]}x{cost['cam_shape'][1]}) of {model}, "
        f"onnxruntime, one thread, batch 1, median of {cost['rounds']} interleaved rounds "
        f"(their range): without the output {shown('without_cam')}, with it "
        f"{shown('with_cam_all_asked')}, with it but only the logits asked for "
        f"{shown('with_cam_logits_asked')}"
    )


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for key, title in (
        ("service_batching_off", "service, batching off"),
        ("service_batching_on", "service, batching on"),
        ("naive_keras", "naive Keras"),
    ):
        runs = results[key]["classify"]
        levels = [run["concurrency"] for run in runs]
        throughput.plot(levels, [run["images_per_second"] for run in runs], marker="o", label=title)
        latency.plot(levels, [run["p99_ms"] for run in runs], marker="o", label=title)
    throughput.axhline(
        results["limit"]["batch_1"]["images_per_second"],
        linestyle="--",
        color="grey",
        label="in-process limit, batch 1",
    )
    for axes, label in ((throughput, "images/s"), (latency, "p99 latency, ms")):
        axes.set_xscale("log", base=2)
        axes.set_xlabel("concurrent clients")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
    latency.set_yscale("log")
    throughput.legend(fontsize=8)
    figure.suptitle("/classify, single-image requests")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
