"""The hot routes answered in the service's middleware (service/http/fast_path.py) behave as
through the mounted FastAPI app: two real ``bentoml serve``, ``FAST_PATH=1`` and ``0``, give the
same status, JSON and headers to the same requests, errors included; and in-process, the fast
path answers those routes without ever calling the app behind the middleware."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.helpers import bentoml_server, encode_image

pytestmark = [pytest.mark.slow]

IDS = ("request_id",)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode_image(rng.integers(0, 256, (28, 28), dtype=np.uint8), "PNG")


def _requests(model_name: str) -> list[tuple[str, str, dict]]:
    """(method, path, httpx arguments): answers, and each kind of error, on every fast route."""
    png, other = _png(1), _png(2)
    tensor = {
        "inputs": [
            {"name": "image", "shape": [1, 28, 28, 1], "datatype": "UINT8", "data": [0] * 784}
        ]
    }
    return [
        ("POST", "/classify", {"files": {"image": ("a.png", png, "image/png")}}),
        ("POST", "/classify", {"files": {"image": ("a.png", png)}, "data": {"top_k": "2"}}),
        ("POST", "/classify?top_k=1", {"content": png, "headers": {"content-type": "image/png"}}),
        ("POST", "/classify", {"files": {"image": ("a.png", png)}, "data": {"top_k": "x"}}),
        ("POST", "/classify", {"files": {"image": ("a.png", png)}, "data": {"top_k": "99"}}),
        ("POST", "/classify", {"files": {"other": ("a.png", png)}}),
        ("POST", "/classify", {"data": {"image": "text"}}),
        ("POST", "/classify", {"files": {"image": ("a.txt", b"not an image")}}),
        ("POST", "/classify", {"content": b"{}", "headers": {"content-type": "text/plain"}}),
        ("POST", "/classify", {"content": b"", "headers": {"content-type": "image/png"}}),
        (
            "POST",
            "/classify",
            {
                "content": b"--x\r\nbroken",
                "headers": {"content-type": "multipart/form-data; boundary=x"},
            },
        ),
        ("POST", "/classify?explain=maybe", {"files": {"image": ("a.png", png)}}),
        (
            "POST",
            "/classify",
            {"files": {"image": ("a.png", png)}, "headers": {"x-request-id": "order-7"}},
        ),
        (
            "POST",
            "/classify",
            {"files": {"image": ("a.png", png)}, "headers": {"x-request-id": "bad id!"}},
        ),
        ("GET", "/classify", {}),
        ("POST", "/classify_batch", {"files": [("images", ("a.png", png)), ("images", other)]}),
        ("POST", "/classify_batch", {"files": {"image": ("a.png", png)}}),
        ("POST", "/classify_batch", {"content": png, "headers": {"content-type": "image/png"}}),
        ("POST", f"/v2/models/{model_name}/infer", {"json": tensor}),
        ("POST", f"/v2/models/{model_name}/infer", {"content": b"{", "headers": {}}),
        ("POST", "/v2/models/elsewhere/infer", {"json": tensor}),
        ("POST", f"/v2/models/{model_name}/versions/nope/infer", {"json": tensor}),
    ]


def _comparable(response: httpx.Response) -> tuple:
    """What must be equal: the status, the JSON (less the per-request ids) and the headers a
    client reads."""
    try:
        body = response.json()
    except json.JSONDecodeError:
        body = response.text
    if isinstance(body, dict):
        body = {key: value for key, value in body.items() if key not in IDS}
        if "predictions" in body:
            body["predictions"] = [
                {key: value for key, value in one.items() if key not in IDS}
                for one in body["predictions"]
            ]
        body.pop("id", None)  # OIP's response id, and its per-image ids, are the request's
        body.get("parameters", {}).pop("request_ids", None)
    headers = {
        name: response.headers.get(name)
        for name in ("content-type", "x-request-id", "allow")
        if name != "x-request-id" or "order-" in response.headers.get(name, "order-")
    }
    return response.status_code, body, headers


def test_the_fast_path_answers_as_the_mounted_app_does(tiny_run):
    name = json.loads((tiny_run["folder"] / "metadata.json").read_text())["name"]
    answers = {}
    for fast in ("1", "0"):
        with (
            bentoml_server(tiny_run["folder"], workers=1, FAST_PATH=fast) as url,
            httpx.Client(base_url=url, timeout=30) as client,
        ):
            answers[fast] = [
                _comparable(client.request(method, path, **arguments))
                for method, path, arguments in _requests(name)
            ]
    statuses = [status for status, _, _ in answers["1"]]
    assert 200 in statuses and any(status >= 400 for status in statuses)
    assert all(status < 500 for status in statuses), statuses
    for fast, slow, (method, path, _) in zip(
        answers["1"], answers["0"], _requests(name), strict=True
    ):
        assert fast == slow, f"{method} {path}"


def test_the_hot_routes_never_reach_the_app_behind_the_middleware(tiny_run):
    from service.http import app
    from service.http.fast_path import FastPath
    from service.http.middleware import ServiceMiddleware

    startup = app.start({"MODEL_PATH": str(tiny_run["folder"]), "MODEL_WATCH_SECONDS": "0"})
    app.serve_on(startup, app.load_worker_model(startup.settings, 1, record=False))
    reached = []

    async def behind(scope, receive, send):
        reached.append(scope["path"])
        await startup.api(scope, receive, send)

    middleware = ServiceMiddleware(
        behind,
        observe=lambda *_: None,
        count_error=lambda *_: None,
        max_bytes=1 << 20,
        max_requests=0,
        fast_path=FastPath(startup.api),
    )
    name = startup.api.state.classification_service.classifier.name

    async def run() -> list[int]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            png = _png(3)
            return [
                (await client.post("/classify", files={"image": ("a.png", png)})).status_code,
                (await client.post("/classify", files={"wrong": ("a.png", png)})).status_code,
                (await client.post("/classify_batch", files=[("images", png)])).status_code,
                (await client.post(f"/v2/models/{name}/infer", content=b"{")).status_code,
                (await client.get("/model")).status_code,
            ]

    import anyio

    assert anyio.run(run) == [200, 400, 200, 400, 200]
    assert reached == ["/model"]
