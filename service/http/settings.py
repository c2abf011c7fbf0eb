"""The service's one typed configuration, read from environment variables (as Kubernetes sets)."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from service.core.classifier import available_cpus
from service.core.postprocessing import DEFAULT_TOP_K
from service.core.preprocessing import DEFAULT_MAX_DECODED_BYTES, DEFAULT_MAX_PIXELS
from service.registry.model_store import DEFAULT_MODEL_NAME

# BATCHING's values, and the other words taken for them.
BATCHING_ON, BATCHING_OFF, BATCHING_AUTO = "on", "off", "auto"
_BATCHING_WORDS = {
    **dict.fromkeys(("1", "true", "yes"), BATCHING_ON),
    **dict.fromkeys(("0", "false", "no"), BATCHING_OFF),
}


def parse_batching(value: str) -> str:
    """``on``, ``off`` or ``auto`` from a ``BATCHING`` value (1/0, true/false, yes/no taken)."""
    word = value.strip().lower()
    word = _BATCHING_WORDS.get(word, word)
    if word not in (BATCHING_ON, BATCHING_OFF, BATCHING_AUTO):
        raise ValueError(f"BATCHING={value!r}: use on, off or auto")
    return word


CAPTURE_MODES = ("off", "unknown", "hard")
# The largest drift window: its scores are held in memory, (window, classes) float32 per worker.
MAX_DRIFT_WINDOW = 100_000


def parse_capture(value: str) -> str:
    """``off``, ``unknown``, ``hard`` or ``sample:P`` (0 < P <= 1) from a ``CAPTURE`` value."""
    word = value.strip().lower()
    if word in CAPTURE_MODES:
        return word
    if word.startswith("sample:"):
        try:
            share = float(word.removeprefix("sample:"))
        except ValueError:
            share = -1.0
        if 0 < share <= 1:
            return f"sample:{share:g}"
    raise ValueError(f"CAPTURE={value!r}: use off, unknown, hard or sample:P with 0 < P <= 1")


@dataclass(frozen=True)
class ServiceSettings:
    """Each field is read from the environment variable of its name in upper case."""

    # Where the model comes from: an artifact folder holding model.onnx (e.g. a mounted volume),
    # else the BentoML model store by tag, else <MODEL_NAME>:latest from the store.
    model_path: str = ""
    model_tag: str = ""
    model_name: str = DEFAULT_MODEL_NAME
    # API worker processes (decode, preprocess, run the model, respond); 0 means one per CPU
    # this process may use (the cgroup limit on Kubernetes).
    workers: int = 0
    # Processes running onnxruntime behind adaptive batching; one batches best on few cores.
    model_workers: int = 1
    # Largest request body, in bytes; larger ones get 413 before they are read.
    max_request_bytes: int = 64 * 1024 * 1024
    # Largest decoded image, in pixels (width x height): refuses decompression bombs.
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    # The most memory one image's decode may hold, in bytes: its pixels in its own mode (Pillow
    # keeps colour in four bytes a pixel) and the full-size copies its conversion needs
    # (service/core/preprocessing.py, decoded_bytes). Refuses a small file that would take
    # hundreds of MiB to decode, from its header.
    max_image_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
    # Decodes running at once in each API worker, each in a thread (an image under 256 KiB
    # decoded, such as a 28x28 PNG, is decoded in place: a thread hop costs more), and requests
    # that may wait for one; past those, 503 ``busy`` with Retry-After. The worst-case decode
    # memory of a worker is MAX_DECODES_IN_FLIGHT x MAX_IMAGE_DECODED_BYTES (README, "Limits").
    max_decodes_in_flight: int = 2
    max_decodes_waiting: int = 16
    # Request headers: their largest total size in bytes, most count, and the longest a client
    # may take to send them; past these, 431 or 408 and the connection is closed
    # (service/http/protocol.py).
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    header_timeout_seconds: float = 10.0
    # The longest a request may take, its body included; past it, BentoML answers 504.
    request_timeout_seconds: int = 60
    # Most images in one /classify_batch request or one /v2 infer tensor.
    max_batch_images: int = 64
    # Adaptive batching: on, off, or auto (chosen at start-up from the model's measured cost,
    # service/http/adaptive_batching.py: on only where a batch clearly costs less per image;
    # measured, neither model this project trains gains from it on CPU, BENCHMARKS.md); then the
    # most images in one onnxruntime call, and the longest a request may wait in the batching
    # queue (BentoML cancels it after that). With batching off, each API worker runs onnxruntime
    # itself.
    batching: str = "auto"
    max_batch_size: int = 64
    batch_max_latency_ms: int = 1000
    # One log line per request in each service; off by default: measured on 2 cores it cost
    # about 15% of the throughput at concurrency 8, and the metrics count every request anyway.
    access_log: bool = False
    # OpenTelemetry spans for requests (BentoML's tracing settings then apply). Off by default:
    # its middleware runs on every request even when no span is sampled (BENCHMARKS.md).
    tracing: bool = False
    # The hot routes (/classify, /classify_batch, OIP infer) answered in the service's own
    # middleware, calling the same route functions without the mounted FastAPI app's stack
    # (service/http/fast_path.py); 0 sends them through both ASGI stacks, for comparison.
    fast_path: bool = True
    # Top-k returned by default.
    default_top_k: int = DEFAULT_TOP_K
    # Answer "unknown" as the label of an input the model's unknown-input detector flags (the
    # closest classes stay in top_k); 0 gives the top class instead. The verdict ("unknown":
    # true) and the score are in every answer either way.
    unknown_label: bool = True
    # Requests a keep-alive connection may carry before the worker closes it and the client
    # reconnects to whichever worker is free (service/http/middleware.py); 0 keeps them forever.
    max_requests_per_connection: int = 20
    # Each API worker looks at its model source this often, in seconds (MODEL_PATH's link, e.g.
    # artifacts/<name>/latest on a volume every replica mounts, or a <name>:latest tag), and
    # swaps to a new version without a restart once it passes the start-up checks
    # (service/http/model_swap.py); 0 turns the watch off. With adaptive batching on, the model
    # runs in another process and a new version needs a restart.
    model_watch_seconds: float = 10.0
    # A challenger run in the shadow of the served model, on the same preprocessed input, off
    # the request path (service/http/shadow.py): an artifact folder or a model-store tag; its
    # answers go to the metrics and the prediction log, never to the caller. SHADOW_SHARE: the
    # share of requests it gets (0 to 1); shed first when the worker is busy.
    shadow_model: str = ""
    shadow_share: float = 1.0
    # Drift checks (service/http/drift.py): each API worker tests every DRIFT_WINDOW images it
    # answers against the reference shipped with the model, off the request path; 0 turns them
    # off. DRIFT_ALPHA: the most a window like the reference is called drifted.
    drift_window: int = 200
    drift_alpha: float = 0.05
    # POST /admin/model/reload (look at the model source now, in the worker that takes the
    # call) takes this operator's bearer token (from a Kubernetes Secret; not the feedback
    # token); empty turns the admin route off.
    admin_token: str = ""
    # POST /feedback takes true labels from callers with this bearer token (from a Kubernetes
    # Secret); empty turns feedback off.
    feedback_token: str = ""
    # The prediction log, which feedback is joined to: a PostgreSQL database every replica
    # shares (postgresql://user:password@host:5432/name, from a Secret). Empty: one SQLite file
    # in FEEDBACK_DIR, which the workers of one machine share. The log is on when
    # FEEDBACK_TOKEN or DATABASE_URL is set.
    database_url: str = ""
    # The embedded log's folder; empty: a folder under the system's temporary folder.
    feedback_dir: str = ""
    # How long the log keeps a prediction, and a label waits for its prediction to land (then
    # it is counted as orphaned).
    feedback_retention_seconds: int = 30 * 24 * 3600
    # Rows of each worker waiting for the database, at most (while it is slow or down); past
    # this, new rows are dropped and counted. Predictions are answered either way.
    prediction_log_buffer: int = 10_000
    # Inputs kept for relabelling: off, unknown (flagged inputs), hard (also those whose top-2
    # margin is below CAPTURE_MARGIN), or sample:P (also a random share P of the rest). Storing
    # users' images is the operator's choice, so it is off by default.
    capture: str = "off"
    capture_dir: str = "captured"
    capture_margin: float = 0.1
    # The store's bound: past it, the oldest entries are evicted (and counted).
    capture_max_bytes: int = 1024**3

    def __post_init__(self) -> None:
        if not 0 <= self.drift_window <= MAX_DRIFT_WINDOW:
            raise ValueError(
                f"DRIFT_WINDOW={self.drift_window}: use 0 (off) or a window of up to "
                f"{MAX_DRIFT_WINDOW} images"
            )
        if not 0 < self.drift_alpha < 1:
            raise ValueError(f"DRIFT_ALPHA={self.drift_alpha}: use a level between 0 and 1")

    @classmethod
    def from_env(cls, environ: dict | None = None) -> ServiceSettings:
        environ = os.environ if environ is None else environ
        values: dict = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw is None or raw == "":
                continue
            kind = field.type if isinstance(field.type, str) else field.type.__name__
            if field.name == "batching":
                values[field.name] = parse_batching(raw)
            elif field.name == "capture":
                values[field.name] = parse_capture(raw)
            elif kind == "float":
                try:
                    values[field.name] = float(raw)
                except ValueError as exc:
                    raise ValueError(f"{field.name.upper()}={raw!r} is not a number") from exc
            elif kind == "bool":
                values[field.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif kind == "int":
                try:
                    values[field.name] = int(raw)
                except ValueError as exc:
                    raise ValueError(f"{field.name.upper()}={raw!r} is not a whole number") from exc
            else:
                values[field.name] = raw
        return cls(**values)

    @property
    def api_workers(self) -> int:
        """API worker processes: ``WORKERS``, or one per available CPU."""
        return self.workers if self.workers > 0 else available_cpus()

    @property
    def feedback_enabled(self) -> bool:
        return bool(self.feedback_token)

    @property
    def prediction_log_enabled(self) -> bool:
        return self.feedback_enabled or bool(self.database_url)

    @property
    def model_reference(self) -> str:
        """The model-store tag to serve when ``MODEL_PATH`` is not set."""
        return self.model_tag or f"{self.model_name}:latest"

    def onnx_threads(self, processes: int) -> int:
        """onnxruntime intra-op threads for each of ``processes`` processes sharing the CPUs."""
        return max(1, available_cpus() // max(1, processes))
