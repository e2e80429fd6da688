"""SD3's and Flux's transformer on ``--backend onnx`` (ONNX Runtime) and ``--backend tensorrt``.

The transformer is exported once (:mod:`~difftool.plugins.builtin.flow.onnx_parts`: validated against
PyTorch, cached by its weights); ONNX Runtime runs the export, TensorRT builds an engine from it for the
profile the run declares. The text encoders and the VAE stay in PyTorch (they run once per image).

Profiles come from the task's declared shapes (:class:`~difftool.core.params.ExportShapes`, whose sizes
are in Stable Diffusion's 8-pixel latent cells): each side in pixels is turned into this model's latent
cells, and Flux's image token count is (side / 2) squared: a 512 px Flux.1 image is 1024 tokens, 1024 px
4096. The batch is 2 where SD3 runs classifier-free guidance, else 1; the text length is the prompt's
(77 CLIP + 256 T5 tokens for SD3, Flux's T5 length).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.task import RunContext
from difftool.plugins.builtin.flow.onnx_parts import TransformerSignature, cached_transformer, graph_inputs
from difftool.plugins.builtin.flow.scheduler import FLOW_PREDICTION
from difftool.runtimes.tensorrt.denoiser import TensorRTDenoiser
from difftool.runtimes.tensorrt.profiles import LATENT_SCALE, Profile

#: Backends that run the exported transformer (``torch`` runs the module itself).
EXPORTED = ("onnx", "tensorrt")
#: The run's side range in pixels when the task declares no shapes: 64 px up to the run's size or 1024.
DEFAULT_PIXELS = (64, 1024)


def side_range(declared: Any, latent: tuple[int, int], vae_scale: int, patch: int) -> tuple[int, int, int]:
    """(min, opt, max) latent side in this model's cells, in multiples of ``patch``, covering ``latent``
    (h, w): the declared pixel range (``declared.size`` times 8 px), else 64 px to 1024 px."""
    short, long = min(latent), max(latent)
    if declared is not None:
        low, opt, high = (s * LATENT_SCALE // vae_scale for s in declared.size)
    else:
        low, opt, high = DEFAULT_PIXELS[0] // vae_scale, long, DEFAULT_PIXELS[1] // vae_scale
    low = max(2 * patch, min(low, short) // patch * patch)  # a single patch row specialises the graph
    high = max(high, long)
    high = -(-high // patch) * patch
    return low, min(max(opt // patch * patch, low), high), high


def transformer_profile(
    signature: TransformerSignature, batch: tuple[int, int, int], sides: tuple[int, int, int], text: int
) -> Profile:
    """The engine profile for ``batch`` and square latent ``sides`` (min, opt, max, in latent cells) with
    ``text`` tokens: Flux's image tokens are (side / 2) squared, SD3 takes the latent itself."""
    c = signature.sample_channels

    def each(make: Any) -> tuple[Any, Any, Any]:
        return tuple(make(b, s) for b, s in zip(batch, sides, strict=True))  # type: ignore[return-value]

    shapes: dict[str, Any] = {
        "encoder_hidden_states": each(lambda b, s: (b, text, signature.text_dim)),
        "pooled_projections": each(lambda b, s: (b, signature.pooled_dim)),
        "timestep": each(lambda b, s: (b,)),
    }
    if signature.arch == "flux":
        shapes["hidden_states"] = each(lambda b, s: (b, (s // 2) ** 2, signature.in_features))
        shapes["img_ids"] = each(lambda b, s: ((s // 2) ** 2, 3))
        shapes["txt_ids"] = each(lambda b, s: (text, 3))
        if signature.guidance:
            shapes["guidance"] = each(lambda b, s: (b,))
    else:
        shapes["hidden_states"] = each(lambda b, s: (b, c, s, s))
    return Profile(shapes)


def run_profile(model: Any, signature: TransformerSignature, context: RunContext, latent: tuple[int, int],
                cfg: bool, text: int) -> Profile:  # fmt: skip
    sides = side_range(context.export_shapes, latent, model.vae_scale, signature.patch)
    sides = (sides[0], sides[1], min(sides[2], signature.max_side)) if signature.arch == "sd3" else sides
    batch = (1, 2, 2) if cfg else (1, 1, 1)
    return transformer_profile(signature, batch, sides, text)


def _out_shape(signature: TransformerSignature, inputs: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    x = inputs["hidden_states"]
    if signature.arch == "flux":
        return (x.shape[0], x.shape[1], 4 * signature.sample_channels)
    return (x.shape[0], signature.sample_channels, *x.shape[2:])


def _result(signature: TransformerSignature, out: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
    from difftool.plugins.builtin.flow.denoiser import unpack

    if signature.arch == "flux":
        out = unpack(out, *sample.shape[-2:])
    return out.to(sample.dtype)


class OnnxTransformerDenoiser(Denoiser):
    """The exported transformer in ONNX Runtime: inputs and output bound by pointer (IO binding)."""

    backend = "onnxruntime"

    def __init__(self, entry: Any, signature: TransformerSignature, *, device: str, options: Mapping[str, Any],
                 profile: Profile | None = None) -> None:  # fmt: skip
        from difftool.core.cuda import runtime
        from difftool.exporters.onnx_modules import MODEL_FILE
        from difftool.runtimes.onnxruntime.denoiser import make_session

        provider = str(options["provider"])
        profile = profile if provider == "tensorrt" else None  # only that provider builds engines
        self.session = make_session(entry.file(MODEL_FILE), device, False, provider, int(options["threads"]), profile)
        self.signature = signature
        self.sample_channels = self.in_channels = signature.sample_channels
        self.prediction_type = FLOW_PREDICTION
        self.device = runtime().placement(device)
        self.dtype = torch.float32  # the export's precision; fp8 and GGUF weights were upcast into it
        self.fingerprint = entry.manifest["key"]

    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from difftool.runtimes.onnxruntime.denoiser import run_bound

        inputs = graph_inputs(self.signature, sample, timestep, cond, self.device)
        out = torch.empty(_out_shape(self.signature, inputs), device=self.device)
        run_bound(self.session, inputs, {"out": out}, self.device)
        return _result(self.signature, out, sample)


class TensorRTTransformerDenoiser(TensorRTDenoiser):
    """The transformer's engine: :class:`TensorRTDenoiser`'s binding, streams and CUDA graphs, its inputs."""

    def __call__(self, sample: Any, timestep: Any, cond: Mapping[str, Any]) -> Any:
        inputs = graph_inputs(self.signature, sample, timestep, cond, self.device)
        return _result(self.signature, self.run(inputs, _out_shape(self.signature, inputs)), sample)


def tensorrt_denoiser(entry: Any, signature: TransformerSignature, profile: Profile, context: RunContext) -> Any:
    """Build (or reuse) the engine for ``profile`` from the fp32 export: strongly typed fp32 on TensorRT 11
    (it builds the graph's precision), the run's precision by flag on TensorRT 10."""
    import tensorrt as trt

    from difftool.runtimes.tensorrt.denoiser import recent_engines
    from difftool.runtimes.tensorrt.engine import (
        BuildOptions,
        cached_engine,
        default_refittable,
        major_version,
        version_tuple,
    )

    resolved = context.resolved_backend()
    options = resolved.backend.validate_options(resolved.options)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(context.torch_dtype, "fp16")
    precision = "fp32" if major_version(trt) >= 11 else precision
    refittable = default_refittable(str(options["refit"]), True, version_tuple(trt))  # LoRAs refit, as for SD
    build = BuildOptions(precision, refittable=refittable, workspace_gb=float(options["workspace_gb"]) or None)
    engine = cached_engine(entry, [profile], build, context.device)
    graphs = str(options["cuda_graphs"])
    key = (engine.manifest["key"], entry.manifest["key"], context.device, graphs)
    return recent_engines().get(
        key,
        lambda: TensorRTTransformerDenoiser(
            engine, [profile], signature=signature, sample_channels=signature.sample_channels,
            prediction_type=FLOW_PREDICTION, device=context.device, onnx=entry, dtype=context.torch_dtype,
            cuda_graphs=graphs,
        ),
    )  # fmt: skip


def transformer_denoiser(model: Any, transformer: Any, context: RunContext, latent: tuple[int, int], *,
                         cfg: bool, text: int) -> Denoiser:  # fmt: skip
    """The transformer on the run's backend: the module itself on ``torch``, else its export.

    ``latent``: the run's (h, w) in latent cells; ``cfg``: SD3's guidance batch; ``text``: the text tokens.
    """
    from difftool.plugins.builtin.flow.denoiser import TransformerDenoiser

    if context.backend_name not in EXPORTED:
        return TransformerDenoiser(transformer, arch=model.family.arch, device=context.device,
                                   dtype=context.torch_dtype)  # fmt: skip
    entry, signature = cached_transformer(model)
    profile = run_profile(model, signature, context, latent, cfg, text)
    if context.backend_name == "tensorrt":
        return tensorrt_denoiser(entry, signature, profile, context)
    resolved = context.resolved_backend()
    options = resolved.backend.validate_options(resolved.options)
    return OnnxTransformerDenoiser(entry, signature, device=context.device, options=options, profile=profile)
