"""Compile denoisers for other runtimes (ONNX now; TensorRT planned), validate them against PyTorch,
and keep them in one content-addressed cache (:mod:`difftool.exporters.cache`).

Nothing here is imported by ``import difftool``; onnx and onnxruntime load only when used.
"""
