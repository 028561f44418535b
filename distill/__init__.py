"""Diffusion math, teacher training, progressive distillation, bundles and samplers."""
