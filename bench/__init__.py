"""Measurement: `halfstep bench` (HTTP, engines, FLOP floor, diffusers baseline).

Nothing in production imports this package.
"""
