"""halfstep: serve progressively distilled diffusion samplers with low latency."""

__version__ = "0.1.0"
