"""Load from wrk, a C load generator that costs the server's two cores little: precomputed request
bodies, a warm-up that is discarded, and the server's own CPU seconds per request and per worker
process, read from /proc while the load runs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

BOUNDARY = "benchmark-boundary-7f3a"
# wrk runs this Lua script in each of its threads: the body is read once from a file, and at the
# end the figures are printed as one JSON line (latencies in microseconds).
SCRIPT = """
local handle = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = handle:read("*a")
handle:close()
wrk.headers["Content-Type"] = "{content_type}"

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    '{{"requests": %d, "duration_us": %d, "socket_errors": %d, "non_2xx": %d, '
    .. '"p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration,
    errors.connect + errors.read + errors.write + errors.timeout, errors.status,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max))
end
"""


def require_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: run 'make bench' (it installs Debian's wrk)")
    return path


def multipart_body(field: str, filename: str, content_type: str, data: bytes) -> tuple[bytes, str]:
    """One file as ``multipart/form-data``, as a browser or ``curl -F`` sends it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; '
        f'filename="{filename}"\r\nContent-Type: {content_type}\r\n\r\n'
    ).encode()
    body = head + data + f"\r\n--{BOUNDARY}--\r\n".encode()
    return body, f"multipart/form-data; boundary={BOUNDARY}"


def worker_pids(server_pid: int) -> list[int]:
    """The processes of a server's tree that serve requests (every Python process in it)."""
    import psutil

    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(server_pid)
        processes = [root, *root.children(recursive=True)]
        return [
            process.pid
            for process in processes
            if "python" in (process.name() or "").lower() or "uvicorn" in process.name()
        ]
    return []


def cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds of each process so far."""
    import psutil

    seconds = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            seconds[pid] = times.user + times.system
    return seconds


def run_wrk(
    url: str,
    body: bytes,
    content_type: str,
    connections: int,
    seconds: float,
    server_pid: int | None = None,
) -> dict:
    """Drive ``POST url`` with ``body`` from ``connections`` keep-alive connections.

    Returns:
        Requests per second, p50/p99 ms, errors, and with ``server_pid`` the server's CPU seconds
        per request and each process's share of the CPU time the load cost.
    """
    wrk = require_wrk()
    with tempfile.TemporaryDirectory() as scratch:
        body_file = Path(scratch) / "body"
        body_file.write_bytes(body)
        script = Path(scratch) / "post.lua"
        script.write_text(SCRIPT.format(body=body_file, content_type=content_type))

        def load(duration: float) -> dict:
            command = [wrk, "-t1", f"-c{connections}", f"-d{duration:g}s", "--timeout", "60s"]
            command += ["-s", str(script), url]
            result = subprocess.run(command, capture_output=True, text=True, check=True)
            line = next(line for line in result.stdout.splitlines() if line.startswith("{"))
            return json.loads(line)

        # Discarded: connections, caches and the allocator settle (2 s; a shorter point, shorter:
        # wrk takes whole seconds).
        load(min(2.0, seconds))
        pids = worker_pids(server_pid) if server_pid else []
        before = cpu_seconds(pids)
        figures = load(seconds)
        after = cpu_seconds(pids)
    requests = max(1, figures["requests"])
    result = {
        "concurrency": connections,
        "requests": figures["requests"],
        "images_per_second": round(figures["requests"] / (figures["duration_us"] / 1e6), 1),
        "p50_ms": round(figures["p50_us"] / 1000, 2),
        "p95_ms": round(figures["p95_us"] / 1000, 2),
        "p99_ms": round(figures["p99_us"] / 1000, 2),
        "max_ms": round(figures["max_us"] / 1000, 2),
        "errors": figures["socket_errors"] + figures["non_2xx"],
    }
    if pids:
        spent = {pid: after.get(pid, 0.0) - before.get(pid, 0.0) for pid in before}
        total = sum(spent.values()) or 1.0
        result["server_cpu_ms_per_request"] = round(1000 * total / requests, 3)
        shares = sorted((value / total for value in spent.values() if value > 0), reverse=True)
        result["cpu_share_by_process"] = [round(share, 3) for share in shares]
    return result
