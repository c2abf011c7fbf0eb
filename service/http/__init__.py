"""The HTTP service: app assembly, the request pipeline, routes, the Open Inference Protocol,
errors, middleware, metrics, settings and adaptive batching. Imports :mod:`service.core`, never
:mod:`service.cli`."""
