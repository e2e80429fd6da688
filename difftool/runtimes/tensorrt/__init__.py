"""TensorRT: engines built from the ONNX exports, cached per GPU, precision and profile."""
