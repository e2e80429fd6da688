"""Stable Diffusion's text encoders and VAE decoder on ONNX Runtime, for a whole pipeline without torch.

``--backend onnx`` runs the U-Net in ONNX Runtime; with ``--backend-opt export=all`` the text
encoders and the VAE are exported (validated, cached) and run there too, so a run calls no torch
module (tiled decodes of very large images still use PyTorch).
"""

from __future__ import annotations

from typing import Any

import torch

from difftool.core.task import RunContext
from difftool.plugins.builtin.sd.loader import SDModel


def whole_pipeline(context: RunContext | None) -> bool:
    """Whether this run exports the text encoders and VAE decoder too."""
    if context is None or context.backend is None or context.backend.name != "onnx":
        return False
    return context.backend.options.get("export") == "all"


class TextEncoderGraph(torch.nn.Module):
    """input_ids -> (first output, every layer's hidden states, the same after the final layer norm).

    All layers come out stacked so clip skip stays a run-time choice (A1111: layer -N, normalised).
    """

    def __init__(self, encoder: Any) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids, output_hidden_states=True)
        hidden = torch.stack(out.hidden_states)
        norm = getattr(self.encoder, "text_model", self.encoder).final_layer_norm
        return out[0], hidden, norm(hidden)


class VaeDecoderGraph(torch.nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent).sample


class VaeEncoderGraph(torch.nn.Module):
    """[-1, 1] image -> the posterior's mean and std (the run samples from them with its own generator)."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(image).latent_dist
        return dist.mean, dist.std


def _dtype_tag(module: Any) -> str:
    return str(next(module.parameters()).dtype).replace("torch.", "")


def text_encoder(model: SDModel, index: int, device: str) -> Any:
    """The ``index``-th text encoder as an :class:`~difftool.runtimes.onnxruntime.module.OnnxModule`."""
    from difftool.exporters.onnx_modules import ModuleSpec, cached_module_export
    from difftool.runtimes.onnxruntime.module import OnnxModule

    encoder = model.text_encoders[index]
    tokens = model.tokenizers[index].model_max_length
    g = torch.Generator().manual_seed(index)
    vocab = int(encoder.config.vocab_size)

    def ids(batch: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, tokens), generator=g)

    spec = ModuleSpec(
        inputs={"input_ids": ids(2)},
        dynamic={"input_ids": {0: ("batch", 1, 64)}},
        outputs=("first", "hidden", "normed"),
        checks=({"input_ids": ids(1)}, {"input_ids": ids(3)}),
    )
    # Weights as they are now (LoRAs fused, dtype as loaded): the id says both.
    model_id = f"{model.unet_id}-te{index}-{_dtype_tag(encoder)}"
    entry = cached_module_export(
        lambda: TextEncoderGraph(encoder).eval(), f"text-encoder-{index}-{model.unet_id[:12]}", spec, model_id
    )
    return OnnxModule(entry, device)  # its session is reused across runs while the file is unchanged


def vae_decoder(model: SDModel, device: str) -> Any:
    """The VAE decoder (latents / scaling factor -> [-1, 1] image) as an ``OnnxModule``."""
    channels = int(model.vae.config.latent_channels)
    return _vae_part(model, device, "decoder", VaeDecoderGraph, "latent", channels, 1, ("image",))


def vae_encoder(model: SDModel, device: str) -> Any:
    """The VAE encoder ([-1, 1] image -> posterior mean and std) as an ``OnnxModule``."""
    return _vae_part(model, device, "encoder", VaeEncoderGraph, "image", 3, model.vae_scale, ("mean", "std"))


def _vae_part(
    model: SDModel, device: str, part: str, graph: type, name: str, channels: int, scale: int, outputs: tuple
) -> Any:
    from difftool.exporters.onnx import weights_hash
    from difftool.exporters.onnx_modules import ModuleSpec, cached_module_export
    from difftool.runtimes.onnxruntime.module import OnnxModule

    vae = model.vae
    g = torch.Generator().manual_seed(0)

    def example(batch: int, h: int, w: int) -> torch.Tensor:  # sizes in latent cells, times ``scale``
        return torch.randn(batch, channels, h * scale, w * scale, generator=g)

    spec = ModuleSpec(
        inputs={name: example(2, 10, 14)},  # batch 2 and distinct sizes: no 0/1 specialisation
        dynamic={name: {0: ("batch", 1, 64), 2: ("h", 2 * scale, 512 * scale), 3: ("w", 2 * scale, 512 * scale)}},
        outputs=outputs,
        checks=({name: example(1, 7, 9)}, {name: example(1, 12, 8)}),
    )
    weights = weights_hash(vae) if model.vae_name else model.sha256  # --vae: a file of its own
    model_id = f"{weights}-vae-{part}-{_dtype_tag(vae)}"
    entry = cached_module_export(lambda: graph(vae).eval(), f"vae-{part}-{weights[:12]}", spec, model_id)
    return OnnxModule(entry, device)  # its session is reused across runs while the file is unchanged
