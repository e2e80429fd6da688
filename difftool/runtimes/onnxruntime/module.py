"""Module exports (text encoders, VAE parts, upscalers) run in ONNX Runtime, once per image."""

from __future__ import annotations

import torch

from difftool.exporters.cache import Entry
from difftool.exporters.onnx_modules import MODEL_FILE


class OnnxModule:
    """Runs a cached module export: torch tensors in, a tuple of torch tensors (on ``device``) out.

    These parts run once per image (not once per step), so plain ``session.run`` is used: outputs
    whose shapes depend on the inputs need no preallocation.
    """

    def __init__(self, entry: Entry, device: str = "cpu") -> None:
        from difftool.core.cuda import runtime
        from difftool.runtimes.onnxruntime.denoiser import make_session

        self.session = make_session(entry.file(MODEL_FILE), device)
        self.device = runtime().placement(device)
        self.fingerprint = entry.manifest["key"]
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, inputs, strict=True)}
        return tuple(torch.from_numpy(out).to(self.device) for out in self.session.run(None, feeds))
