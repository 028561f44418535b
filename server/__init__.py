"""The HTTP service: FastAPI app, dynamic batcher, metrics, settings and client."""
