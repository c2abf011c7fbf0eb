"""Spread keep-alive connections across the API workers: each connection is closed, politely,
after a number of requests, and its client reconnects.

BentoML's API workers share one listening socket, and a burst of new connections is accepted by
whichever worker wakes first, which then keeps them all for as long as they stay open (BentoML
issue #5426): one core serves while the other idles. A reconnecting client is accepted by a
worker that is waiting for work, which is the idle one, so recycling connections moves load to
where the CPU is free. This is nginx's ``keepalive_requests`` and Envoy's
``max_requests_per_connection``; a reconnect on loopback or in a cluster costs far less than a
request.
"""

from __future__ import annotations

from collections import OrderedDict

# Connections tracked per worker; the oldest are forgotten first (a client that left on its own).
TRACKED_CONNECTIONS = 4096


class ConnectionRecycleMiddleware:
    """Answer the ``max_requests``-th request of each connection with ``Connection: close``."""

    def __init__(self, app, max_requests: int):
        self.app = app
        self.max_requests = max_requests
        self.served: OrderedDict[tuple, int] = OrderedDict()

    async def __call__(self, scope, receive, send):
        client = scope.get("client") if scope["type"] == "http" else None
        if self.max_requests <= 0 or client is None:
            return await self.app(scope, receive, send)
        key = tuple(client)
        count = self.served.pop(key, 0) + 1
        if count >= self.max_requests:
            last = True
        else:
            last = False
            self.served[key] = count
            if len(self.served) > TRACKED_CONNECTIONS:
                self.served.popitem(last=False)

        async def closing_send(message):
            if last and message["type"] == "http.response.start":
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"
                ]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        return await self.app(scope, receive, closing_send if last else send)
