"""Shared fixtures of the Open Inference Protocol tests: the tiny-bundle app with /v2 added."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from halfstep.server.oip import router

from .test_server_support import make_app


def make_oip_app(bundle_dir, **settings):
    """make_app's app and engine, with the /v2 router included (as app.py would)."""
    app, engine = make_app(bundle_dir, **{"max_body_bytes": 1 << 20, **settings})
    app.include_router(router)
    return app, engine


def png_pixels(png: bytes) -> np.ndarray:
    """[H, W, C] uint8 pixels of a PNG."""
    pixels = np.array(Image.open(io.BytesIO(png)))
    return pixels[..., None] if pixels.ndim == 2 else pixels
