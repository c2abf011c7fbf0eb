"""A new model version without a restart, in each API worker.

Every ``MODEL_WATCH_SECONDS`` a thread of the worker looks at its model source
(:class:`service.registry.watch.SourceWatch`): the ``latest`` link of ``MODEL_PATH`` or a
``name:latest`` tag. A new version is loaded beside the served one, off the event loop, and must
pass the start-up checks (the contract, the signature, one inference). Only then does it take
over, in one assignment: a request reads the classifier once when it starts
(:meth:`service.http.pipeline.ClassificationService.classify`), so requests in flight finish on
the version they started with, and each answer and prediction-log row names its version. A
version that fails is refused in one log line and counted; the served one keeps serving.

``POST /admin/model/reload`` (bearer ``ADMIN_TOKEN``) runs the same check at once in the worker
that takes the call, and answers its outcome; the other workers, and the other replicas that
share the source, follow at their next poll.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.http.errors import ApiError
from service.http.metrics import get_metrics, record_model_loaded, record_model_unloaded
from service.http.pipeline import ClassificationService, Service
from service.registry.watch import REFUSED, SWAPPED, Check, SourceWatch

log = logging.getLogger("service")
router = APIRouter()
BEARER = {"WWW-Authenticate": "Bearer"}


class ModelSwapper:
    """Swaps the worker's served classifier when its source names a new, servable version.

    Args:
        service: the worker's request pipeline, whose classifier is replaced.
        watch: the source and the version served now.
        interval: seconds between two looks at the source; 0: only on an operator's call.
    """

    def __init__(self, service: ClassificationService, watch: SourceWatch, interval: float):
        self.service, self.watch, self.interval = service, watch, interval
        self.metrics = get_metrics()
        self._lock = threading.Lock()  # one check at a time: the poll or an operator's call
        self._stop = threading.Event()
        self._last_refusal: tuple | None = None

    def start(self) -> None:
        """Poll the source in a daemon thread, if it can name another version."""
        if self.interval > 0 and self.watch.watchable:
            threading.Thread(target=self._poll, name="model-watch", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # the watch must outlive any one failed look
                log.exception("model watch: the check failed; the served model keeps serving")

    def check(self, force: bool = False) -> Check:
        """Look at the source once, and swap to a new version that passes its checks."""
        with self._lock:
            started = time.perf_counter()
            old = self.service.classifier
            result = self.watch.check(force)
            if result.outcome == SWAPPED:
                new = result.classifier
                self.service.classifier = new  # requests that start from now on use it
                record_model_unloaded(old.contract)
                record_model_loaded(new.contract, time.perf_counter() - started)
                self.metrics.model_swaps.labels(SWAPPED).inc()
                self._last_refusal = None
                log.info(
                    "model swapped: %s version %s -> %s version %s (%s), checked in %.2f s",
                    old.name, old.version, new.name, new.version, result.folder,
                    time.perf_counter() - started,
                )  # fmt: skip
            elif result.outcome == REFUSED:
                self.metrics.model_swaps.labels(REFUSED).inc()
                refusal = (result.folder, result.reason)
                if refusal != self._last_refusal or force:  # one line per refusal, not per poll
                    log.warning(
                        "model refused: %s; still serving %s version %s",
                        result.reason, old.name, old.version,
                    )  # fmt: skip
                self._last_refusal = refusal
            return result


def check_admin_token(request: Request, expected: str) -> None:
    """The caller's bearer token against ``ADMIN_TOKEN``, compared in constant time."""
    if not expected:
        raise ApiError(404, "admin_off", "the admin routes are off: the service has no ADMIN_TOKEN")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise ApiError(401, "unauthorized", "send the admin token: Authorization: Bearer <token>",
                       BEARER)  # fmt: skip
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "the admin token is wrong", BEARER)


@router.post(
    "/admin/model/reload",
    summary="Load the version the model source names now, if it passes its checks (admin token)",
)
async def reload_model(request: Request, service: Service) -> JSONResponse:
    check_admin_token(request, service.settings.admin_token)
    swapper: ModelSwapper | None = getattr(request.app.state, "model_swapper", None)
    if swapper is None:
        raise ApiError(
            409,
            "swap_unavailable",
            "this service cannot swap its model without a restart (adaptive batching is on: "
            "the model runs in another process)",
        )
    result = await anyio.to_thread.run_sync(swapper.check, True)
    served = service.classifier
    body = {
        "outcome": result.outcome,
        "model": {"name": served.name, "version": served.version},
        "source": None if result.folder is None else str(result.folder),
    }
    if result.outcome == REFUSED:
        return JSONResponse(
            {"error": "model_refused", "detail": result.reason, **body}, status_code=422
        )
    return JSONResponse(body)
