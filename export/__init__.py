"""Compile N-step students to ONNX and TensorRT, and the engines that run them."""
