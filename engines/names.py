"""Backend names, importable without torch (the command line lists them in --help)."""

BACKENDS = ("auto", "torch", "cudagraph", "onnxruntime", "tensorrt")
