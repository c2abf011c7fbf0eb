"""The API's classification paths and the bounded ``endpoint`` label each is counted under in
the metrics, defined once for the routes, the request pipeline and the error middleware."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Endpoint:
    path: str  # the route's path; OIP's paths are templates
    label: str  # its value of the metrics' ``endpoint`` label


CLASSIFY = Endpoint("/classify", "classify")
CLASSIFY_BATCH = Endpoint("/classify_batch", "classify_batch")
V2_INFER = Endpoint("/v2/models/{name}/infer", "v2_infer")
V2_VERSION_INFER = Endpoint("/v2/models/{name}/versions/{version}/infer", "v2_infer")
_BY_PATH = {endpoint.path: endpoint.label for endpoint in (CLASSIFY, CLASSIFY_BATCH)}


def endpoint_label(path: str) -> str:
    """A bounded label for a request path (never the raw path: model names are user input)."""
    if path in _BY_PATH:
        return _BY_PATH[path]
    if path.startswith("/v2/models/") and path.endswith("/infer"):
        return V2_INFER.label
    if path.startswith("/v2"):
        return "v2"
    return "other"
