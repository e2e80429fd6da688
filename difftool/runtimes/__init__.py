"""Where denoisers run besides PyTorch: each runtime holds its backend and what it builds (engines,
model-repository entries) from the exporters' ONNX files."""
