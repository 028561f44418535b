"""Diffusion math, teacher training, progressive distillation, bundles and sampling engines."""
