"""Compile denoisers (and SD's text encoders and VAE) for other runtimes (ONNX Runtime, TensorRT, Triton),
validate them against PyTorch, and keep them in one content-addressed cache (:mod:`difftool.exporters.cache`).

Nothing here is imported by ``import difftool``; onnx and onnxruntime load only when used.
"""
