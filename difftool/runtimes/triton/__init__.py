"""Triton Inference Server: model-repository exports and a remote denoiser."""
