"""Compilers from a bundle to files: ONNX graphs and TensorRT plans, each checked for parity."""
