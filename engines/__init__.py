"""Engines run a whole N-step sampler on a batch: the Engine interface and every backend."""
