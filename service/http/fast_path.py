"""The hot routes answered in the service's own middleware, without the second ASGI stack.

BentoML mounts the FastAPI app inside its own Starlette app: a request that reaches a route
passes BentoML's router (whose mount asks every FastAPI route whether it matches), then the
FastAPI app's error middleware, router and per-route wrappers. For ``POST /classify``,
``/classify_batch`` and OIP ``infer`` that second stack is most of the service's own time per
request (BENCHMARKS.md). :class:`FastPath` finds those routes by their exact path and method
and calls the very route functions the FastAPI app registers (so the behaviour, the request
ids, the errors and the OpenAPI page stay the ones of :mod:`service.http.routes` and
:mod:`service.http.oip_routes`), with the FastAPI app's own exception handlers. Any other
request, or another method on these paths, goes through the stacks as before."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from service.http import oip_routes, routes
from service.http.endpoints import CLASSIFY, CLASSIFY_BATCH
from service.http.pipeline import service_of

Route = Callable[[Request], Awaitable[Response]]
# OIP's inference paths (their templates are in service/http/endpoints.py): a path segment is
# what Starlette's default ``str`` converter matches, anything but "/".
_INFER = re.compile(r"/v2/models/([^/]+)/infer")
_VERSION_INFER = re.compile(r"/v2/models/([^/]+)/versions/([^/]+)/infer")


async def _infer(request: Request) -> Response:
    (name,) = request.path_params.values()
    return await oip_routes.infer(name, request, service_of(request))


async def _version_infer(request: Request) -> Response:
    name, version = request.path_params.values()
    return await oip_routes.version_infer(name, version, request, service_of(request))


class FastPath:
    """The hot routes of ``api`` (the FastAPI app, whose state holds the worker's service and
    whose exception handlers give errors their JSON shape), answered as plain ASGI."""

    EXACT: dict[str, Route] = {
        CLASSIFY.path: routes.classify,
        CLASSIFY_BATCH.path: routes.classify_batch,
    }

    def __init__(self, api) -> None:
        self.api = api

    def route_for(self, scope) -> tuple[Route, dict[str, str]] | None:
        """The route that answers this request, with its path parameters; None to leave the
        request to the ASGI stacks."""
        if scope.get("method") != "POST":
            return None
        path = scope.get("path", "")
        route = self.EXACT.get(path)
        if route is not None:
            return route, {}
        if not path.startswith("/v2/models/") or not path.endswith("/infer"):
            return None
        if match := _INFER.fullmatch(path):
            return _infer, {"name": match[1]}
        if match := _VERSION_INFER.fullmatch(path):
            return _version_infer, {"name": match[1], "version": match[2]}
        return None

    async def answer(self, found: tuple[Route, dict[str, str]], scope, receive, send) -> None:
        """Run the route on the request and send its response; an exception the FastAPI app
        has a handler for is answered by that handler, any other propagates."""
        route, parameters = found
        scope["app"] = self.api  # where the routes find the worker's service
        scope["path_params"] = parameters
        request = Request(scope, receive)
        try:
            response = await route(request)
        except Exception as error:
            handler = self._handler(error)
            if handler is None:
                raise
            response = await handler(request, error)
        await response(scope, receive, send)

    def _handler(self, error: Exception):
        handlers = self.api.exception_handlers
        for kind in type(error).__mro__:
            if kind in handlers:
                return handlers[kind]
        return None
