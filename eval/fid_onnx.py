"""The FID Inception network through ONNX Runtime: the same features, about 2x faster on CPU.

ONNX Runtime's CPU kernels beat TorchScript (even with a channels-last input) at features
within 1e-5 of TorchScript's. The exported graph is cached next to the reference statistics,
keyed by the sha256 of `default_1.pt`, and checked against TorchScript on a fixed batch every
time it is loaded; a graph that disagrees is not used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from halfstep.distill.io import atomic_write, sha256_file

log = logging.getLogger(__name__)
PARITY_ATOL = 1e-4  # features are O(0.1-1); a faithful export differs by ~1e-5 at most


def onnxruntime_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def _export(model: torch.jit.ScriptModule, example: torch.Tensor, path: Path) -> None:
    def write(tmp: str) -> None:
        torch.onnx.export(model, (example,), tmp, input_names=["images"],
                          output_names=["features"], opset_version=17, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}})

    atomic_write(path, write)


class OnnxInception:
    """Callable float32 [B, 3, 299, 299] tensor -> features tensor, on ONNX Runtime's CPU EP."""

    def __init__(self, onnx_path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (out,) = self.session.run(None, {"images": x.contiguous().numpy()})
        return torch.from_numpy(out)


def load_onnx_inception(model: torch.jit.ScriptModule, weights: Path,
                        cache_dir: str | os.PathLike, probe: torch.Tensor) -> OnnxInception | None:
    """The cached (or freshly exported) ONNX graph of `model`, or None if it cannot be used.

    `probe` is a network input [B, 3, 299, 299]; the graph must reproduce TorchScript's features
    on it within PARITY_ATOL.
    """
    if not onnxruntime_available():
        return None
    path = Path(cache_dir) / "inception" / f"{sha256_file(weights)[:16]}.onnx"
    for attempt in ("cached", "fresh"):
        try:
            if attempt == "fresh" or not path.is_file():
                log.info("exporting the Inception network to %s (once)", path)
                _export(model, probe, path)
            runner = OnnxInception(path, torch.get_num_threads())
            with torch.no_grad():
                expected = model(probe).reshape(len(probe), -1)
            error = (runner(probe).reshape(len(probe), -1) - expected).abs().max().item()
        except Exception as exc:  # unreadable cached file: export again; else fall back
            if attempt == "cached":
                continue
            log.warning("ONNX Runtime Inception unavailable (%s); using TorchScript", exc)
            return None
        if error <= PARITY_ATOL:
            return runner
        log.warning("ONNX Inception (%s) differs from TorchScript by %.2e > %.0e", attempt, error,
                    PARITY_ATOL)
    return None  # a fresh export that still disagrees: TorchScript it is
