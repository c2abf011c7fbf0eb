"""The ratios a benchmark run is judged by, each from its measured figures, and the targets
they are held to."""

from __future__ import annotations


def backbone_on_vs_off(results: dict, concurrency: int) -> float:
    """Images/s of ``/classify`` on the backbone model, batching on over off."""
    backbone = results["backbone"]
    on, off = (
        next(run for run in backbone[key]["classify"] if run["concurrency"] == concurrency)
        for key in ("service_batching_on", "service_batching_off")
    )
    return round(on["images_per_second"] / off["images_per_second"], 3)


def loop_ratio(results: dict, payload: str, setting: str = "feedback_capture_all") -> float:
    """p50 of ``/classify`` with feedback on and a capture setting, over with both off."""
    loop = results["loop"]
    on, off = loop[setting][payload], loop["off"][payload]
    return round(on["p50_ms"] / off["p50_ms"], 3)


def explain_ratio(explain: dict, payload: str, mode: str, concurrency: int) -> float:
    """p50 of ``/classify`` with ``explain`` = ``mode`` over without, multipart."""
    runs = explain[f"{payload} multipart"][f"c{concurrency}"]
    return round(runs[mode]["p50_ms"] / runs["off"]["p50_ms"], 3)


def ratios(results: dict) -> dict:
    on, off = results["service_batching_on"], results["service_batching_off"]
    shipped = results[f"service_batching_{results['shipped_batching']}"]
    by_concurrency = {run["concurrency"]: run for run in shipped["classify"]}
    raw_png = {run["concurrency"]: run for run in shipped["payloads"]["png raw"]}
    naive = {run["concurrency"]: run for run in results["naive_keras"]["classify"]}
    on_c32 = next(run for run in on["classify"] if run["concurrency"] == 32)
    off_c32 = next(run for run in off["classify"] if run["concurrency"] == 32)
    png_all_cores = results["payload_limits"]["png"]["all_cores_images_per_second"]

    def versus(baseline: str, payload: str, concurrency: int, section: dict = results) -> float:
        served = section[f"service_batching_{section['shipped_batching']}"]
        ours = {run["concurrency"]: run for run in served["payloads"][payload]}
        other = {run["concurrency"]: run for run in section[baseline]["payloads"][payload]}
        return round(
            ours[concurrency]["images_per_second"] / other[concurrency]["images_per_second"], 3
        )

    backbone = results["backbone"]
    backbone_served = backbone[f"service_batching_{backbone['shipped_batching']}"]
    backbone_runs = [run for runs in backbone_served["payloads"].values() for run in runs]
    backbone_raw_png = {run["concurrency"]: run for run in backbone_served["payloads"]["png raw"]}
    plain_fastapi = {
        f"{model}{payload}_multipart_vs_plain_fastapi_c{concurrency}": versus(
            "plain_fastapi", f"{payload} multipart", concurrency, section
        )
        for model, section in (("", results), ("backbone_", backbone))
        for payload in ("png", "jpeg")
        for concurrency in (8, 32)
    }

    shipped_runs = [run for runs in shipped["payloads"].values() for run in runs]
    return {
        "service_vs_naive_c32": round(
            by_concurrency[32]["images_per_second"] / naive[32]["images_per_second"], 2
        ),
        **plain_fastapi,
        "png_multipart_vs_docs_style_c8": versus("docs_style", "png multipart", 8),
        "png_multipart_vs_docs_style_c32": versus("docs_style", "png multipart", 32),
        "jpeg_multipart_vs_docs_style_c32": versus("docs_style", "jpeg multipart", 32),
        "raw_png_vs_all_cores_limit_c8": round(raw_png[8]["images_per_second"] / png_all_cores, 3),
        "raw_png_vs_all_cores_limit_c32": round(
            raw_png[32]["images_per_second"] / png_all_cores, 3
        ),
        "backbone_raw_png_vs_all_cores_limit_c32": round(
            backbone_raw_png[32]["images_per_second"]
            / backbone["payload_limits"]["png"]["all_cores_images_per_second"],
            3,
        ),
        "p99_over_p50_worst": round(max(run["p99_ms"] / run["p50_ms"] for run in shipped_runs), 2),
        "backbone_p99_over_p50_worst": round(
            max(run["p99_ms"] / run["p50_ms"] for run in backbone_runs), 2
        ),
        "busiest_process_cpu_share_c32": max(
            run["cpu_share_by_process"][0] for run in shipped_runs if run["concurrency"] == 32
        ),
        "backbone_busiest_process_cpu_share_c32": max(
            run["cpu_share_by_process"][0] for run in backbone_runs if run["concurrency"] == 32
        ),
        "batch_endpoint_vs_limit": round(
            shipped["classify_batch"]["images_per_second"]
            / results["limit"]["batch_64"]["images_per_second"],
            3,
        ),
        "overhead_ms_c1_p50": round(
            by_concurrency[1]["p50_ms"] - results["limit"]["batch_1"]["p50_ms"], 2
        ),
        "batching_on_vs_off_c32": round(
            on_c32["images_per_second"] / off_c32["images_per_second"], 3
        ),
        "int8_vs_float32_onnxruntime_batch_1": round(
            results["int8"]["batch_1_us_float32"] / results["int8"]["batch_1_us_int8"], 2
        )
        if "batch_1_us_int8" in results["int8"]
        else None,
        "cli_photos_vs_all_cores_limit": round(
            results["cli"]["images_per_second"]
            / results["payload_limits"]["jpeg"]["all_cores_images_per_second"],
            3,
        ),
        "backbone_batching_on_vs_off_c8": backbone_on_vs_off(results, 8),
        "backbone_batching_on_vs_off_c32": backbone_on_vs_off(results, 32),
        "backbone_phase_1_cached_vs_uncached": round(
            results["backbone"]["training"]["phase_1_uncached_seconds_estimate"]
            / (
                results["backbone"]["training"]["phase_1_feature_seconds"]
                + results["backbone"]["training"]["phase_1_head_fit_seconds"]
            ),
            2,
        ),
        "cam_output_cost_onnxruntime_batch_1": results["cam_cost"].get("with_over_without"),
        "backbone_cam_output_cost_onnxruntime_batch_1": results["backbone"]["cam_cost"].get(
            "with_over_without"
        ),
        "explain_map_p50_vs_off_png_c1": explain_ratio(results["explain"], "png", "map", 1),
        "explain_png_p50_vs_off_png_c1": explain_ratio(results["explain"], "png", "png", 1),
        "explain_png_p50_vs_off_jpeg_c1": explain_ratio(results["explain"], "jpeg", "png", 1),
        "backbone_explain_map_p50_vs_off_c1": explain_ratio(
            results["backbone"]["explain"], "jpeg", "map", 1
        ),
        "backbone_explain_png_p50_vs_off_c1": explain_ratio(
            results["backbone"]["explain"], "jpeg", "png", 1
        ),
        "capture_all_p50_vs_off_png_c8": loop_ratio(results, "png multipart"),
        "capture_all_p50_vs_off_jpeg_c8": loop_ratio(results, "jpeg multipart"),
        "capture_hard_p50_vs_off_png_c8": loop_ratio(
            results, "png multipart", "feedback_capture_hard"
        ),
        "capture_hard_p50_vs_off_jpeg_c8": loop_ratio(
            results, "jpeg multipart", "feedback_capture_hard"
        ),
        "feedback_p50_vs_off_png_c8": loop_ratio(results, "png multipart", "feedback"),
        **results["prediction_log"]["ratios"],
        "training_pipeline_vs_fit": round(
            results["training"]["pipeline_images_per_second"]
            / results["training"]["in_memory_fit_images_per_second"],
            3,
        ),
    }


TARGETS = {
    "service_vs_naive_c32": (">=", 10),
    **{
        f"{model}{payload}_multipart_vs_plain_fastapi_c{concurrency}": (">=", 0.95)
        for model in ("", "backbone_")
        for payload in ("png", "jpeg")
        for concurrency in (8, 32)
    },
    "png_multipart_vs_docs_style_c8": (">=", 3),
    "png_multipart_vs_docs_style_c32": (">=", 3),
    "jpeg_multipart_vs_docs_style_c32": (">=", 3),
    "raw_png_vs_all_cores_limit_c8": (">=", 0.5),
    "raw_png_vs_all_cores_limit_c32": (">=", 0.5),
    "backbone_raw_png_vs_all_cores_limit_c32": (">=", 0.5),
    "p99_over_p50_worst": ("<=", 3),
    "backbone_p99_over_p50_worst": ("<=", 3),
    "busiest_process_cpu_share_c32": ("<=", 0.65),
    "backbone_busiest_process_cpu_share_c32": ("<=", 0.65),
    "batch_endpoint_vs_limit": (">=", 0.6),
    "overhead_ms_c1_p50": ("<=", 5),
    "training_pipeline_vs_fit": (">=", 0.9),
    "cli_photos_vs_all_cores_limit": (">=", 0.8),
    "capture_all_p50_vs_off_png_c8": ("<=", 1.1),
    "capture_all_p50_vs_off_jpeg_c8": ("<=", 1.1),
    "capture_hard_p50_vs_off_png_c8": ("<=", 1.1),
    "capture_hard_p50_vs_off_jpeg_c8": ("<=", 1.1),
    **{f"log_postgres_p50_vs_off_{payload}_c8": ("<=", 1.1) for payload in ("png", "jpeg")},
    **{f"log_postgres_rps_vs_off_{payload}_c8": (">=", 0.95) for payload in ("png", "jpeg")},
}


def target_status(name: str, value: float) -> str:
    if name not in TARGETS:
        return "measured"
    sign, bound = TARGETS[name]
    held = value >= bound if sign == ">=" else value <= bound
    return f"{'holds' if held else 'MISSED'} ({sign} {bound})"
