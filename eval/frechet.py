"""Feature statistics and the Frechet distance between two Gaussians (Heusel et al. 2017, FID).

d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)).

pytorch-fid and fid-helper take scipy.linalg.sqrtm(S_1 S_2), a Schur decomposition of a
non-symmetric 2048x2048 matrix: tens of seconds per row on a small CPU. S_1 S_2 is similar to
the symmetric PSD matrix S_1^(1/2) S_2 S_1^(1/2), so Tr (S_1 S_2)^(1/2) is the sum of the square
roots of its eigenvalues; we compute those with scipy.linalg.eigvalsh and cache S_1^(1/2) of
the reference (scipy.linalg.eigh). tests/test_eval.py checks it against the sqrtm formula.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance of n feature vectors (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        feats = np.asarray(features, dtype=np.float64)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need at least 2 feature vectors [n, d], got shape {feats.shape}")
        return cls(feats.mean(axis=0), np.cov(feats, rowvar=False), feats.shape[0])

    @cached_property
    def sigma_sqrt(self) -> np.ndarray:
        """The symmetric PSD square root of sigma (negative round-off eigenvalues clipped)."""
        from scipy import linalg

        w, v = linalg.eigh(self.sigma)
        return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic write (temp file + rename) so a killed run never leaves half a cache file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
        np.savez(tmp, mu=self.mu, sigma=self.sigma, n=np.int64(self.n))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path) as data:
            return cls(data["mu"], data["sigma"], int(data["n"]))


def frechet_distance(reference: FeatureStats, other: FeatureStats) -> float:
    """Squared Frechet distance between N(mu_r, S_r) and N(mu_o, S_o).

    Symmetric in its arguments; pass the cached reference first so its square root is reused.
    """
    from scipy import linalg

    if reference.mu.shape != other.mu.shape:
        raise ValueError(f"feature sizes differ: {reference.mu.shape} vs {other.mu.shape}")
    diff = reference.mu - other.mu
    root = reference.sigma_sqrt
    eigenvalues = linalg.eigvalsh(root @ other.sigma @ root)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    value = diff @ diff + np.trace(reference.sigma) + np.trace(other.sigma) - 2.0 * trace_sqrt
    return float(max(value, 0.0))
