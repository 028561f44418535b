"""The HTTP service: app (wiring), routes, request (parameters), codec (encoding), errors
(refusals), batcher, lifespan, state, metrics, settings, client and the `serve` CLI."""
