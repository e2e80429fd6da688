"""ONNX exports for ControlNet: the ControlNet (residuals out) and a U-Net that takes them in.

The ControlNet graph takes the U-Net's inputs (sample, timestep, text, SDXL's added conditions) plus
``controlnet_cond``, the control image at pixel resolution, and returns its raw residuals
(``down_0`` ... ``down_N``, ``mid``) at ``conditioning_scale`` 1 and without guess mode: both only
scale the residuals, so a runtime applies a unit's weight (and guess mode's per-block scales) to the
outputs. The U-Net graph takes the same inputs as :mod:`difftool.exporters.onnx`'s plus those residuals.
Both are validated against PyTorch on random inputs at two shapes, as the U-Net export is. Batch,
height, width and token count are dynamic; each residual's size follows the sample's.

The ``onnx`` and ``tensorrt`` backends take them from the artifact cache (:func:`cached_controlnet`,
:func:`cached_residual_unet`): fp32 graphs keyed by the weights, graph signature, opset and versions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftool.core.errors import ModelError, ParameterError
from difftool.exporters.cache import ArtifactCache, Entry
from difftool.exporters.onnx import (
    MODEL_FILE,
    OPSET,
    TOLERANCE,
    VALIDATION_SHAPES,
    UNetSignature,
    cpu_fp32,
    example_inputs,
    weights_hash,
)  # fmt: skip


@dataclass(frozen=True)
class Residuals:
    """What a ControlNet hands its U-Net: (channels, downscale from the sample) per down-block output
    (the input convolution's, each resnet's, each downsampler's), then the middle block's."""

    down: tuple[tuple[int, int], ...]
    mid: tuple[int, int]

    @classmethod
    def of(cls, config: Any) -> Residuals:
        channels, layers = list(config.block_out_channels), config.layers_per_block
        if not isinstance(layers, int):
            raise ModelError("ONNX export needs the same layers_per_block in every block", "use --backend torch")
        down = [(channels[0], 1)]
        for i, width in enumerate(channels):
            down += [(width, 2**i)] * layers
            if i < len(channels) - 1:
                down.append((width, 2 ** (i + 1)))
        return cls(tuple(down), (channels[-1], 2 ** (len(channels) - 1)))

    @property
    def names(self) -> list[str]:
        return [f"down_{i}" for i in range(len(self.down))] + ["mid"]

    def shapes(self, batch: int, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """Each residual's shape for a sample of ``height`` x ``width`` (multiples of the downscales)."""
        return [(batch, c, height // d, width // d) for c, d in (*self.down, self.mid)]


@dataclass(frozen=True)
class ControlNetSignature:
    """An exported ControlNet's inputs: its U-Net's (``unet``), and a control image ``cond_scale`` times the
    sample's size with ``cond_channels`` channels."""

    unet: UNetSignature
    cond_channels: int
    cond_scale: int
    residuals: Residuals

    @classmethod
    def of(cls, module: torch.nn.Module) -> ControlNetSignature:
        config = module.config
        if getattr(config, "global_pool_conditions", False):
            raise ModelError("ONNX export does not support pooled ControlNets (shuffle)", "use --backend torch")
        added = getattr(config, "addition_embed_type", None)
        if added not in (None, "text_time") or not isinstance(config.cross_attention_dim, int):
            raise ModelError(f"ONNX export does not support this ControlNet's conditioning ({added})", "use torch")
        base = dict(
            in_channels=int(config.in_channels),
            multiple=2 ** (len(config.down_block_types) - 1),
            class_labels=False,
            out_channels=0,
            context_dim=int(config.cross_attention_dim),
        )
        if added == "text_time":
            pooled = int(config.projection_class_embeddings_input_dim) - 6 * int(config.addition_time_embed_dim)
            base.update(text_embeds_dim=pooled, time_ids=6)
        scale = 2 ** (len(config.conditioning_embedding_out_channels) - 1)
        return cls(UNetSignature(**base), int(config.conditioning_channels), scale, Residuals.of(config))

    def input_names(self) -> list[str]:
        names = self.unet.input_names()
        return [*names[:3], "controlnet_cond", *names[3:]]


class _ControlNetGraph(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, controlnet_cond: Any, *added: Any) -> Any:
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
        down, mid = self.module(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, controlnet_cond=controlnet_cond,
            conditioning_scale=1.0, guess_mode=False, return_dict=False, **kwargs,
        )  # fmt: skip
        return (*down, mid)


class _ResidualUNetGraph(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, xl: bool) -> None:
        super().__init__()
        self.module, self.xl = module, xl

    def forward(self, sample: Any, timestep: Any, encoder_hidden_states: Any, *rest: Any) -> Any:
        added = {"text_embeds": rest[0], "time_ids": rest[1]} if self.xl else None
        residuals = rest[2:] if self.xl else rest
        return self.module(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added,
            down_block_additional_residuals=tuple(residuals[:-1]), mid_block_additional_residual=residuals[-1],
        ).sample  # fmt: skip


def controlnet_inputs(signature: ControlNetSignature, batch: int, h: int, w: int, seed: int = 0) -> list[Any]:
    shared = example_inputs(signature.unet, batch, h, w, seed)
    side = signature.unet.multiple * signature.cond_scale
    image = torch.rand(
        batch, signature.cond_channels, h * side, w * side, generator=torch.Generator().manual_seed(seed)
    )
    return [*shared[:3], image, *shared[3:]]


def residual_unet_inputs(
    signature: UNetSignature, residuals: Residuals, batch: int, h: int, w: int, seed: int = 0
) -> list[Any]:
    g = torch.Generator().manual_seed(seed + 1)
    m = signature.multiple
    return [*example_inputs(signature, batch, h, w, seed), *(torch.randn(s, generator=g) * 0.5 for s in
            residuals.shapes(batch, h * m, w * m))]  # fmt: skip


def _dims(signature: UNetSignature) -> tuple[Any, dict[str, Any], Any, Any]:
    batch = torch.export.Dim("batch", min=1, max=256)
    height, width = torch.export.Dim("h", min=1, max=2048), torch.export.Dim("w", min=1, max=2048)
    m = signature.multiple
    shapes: dict[str, Any] = {"sample": {0: batch, 2: m * height, 3: m * width}, "timestep": {0: batch}}
    shapes["encoder_hidden_states"] = {0: batch, 1: torch.export.Dim("tokens", min=1, max=4096)}
    if signature.text_embeds_dim:
        shapes["text_embeds"], shapes["time_ids"] = {0: batch}, {0: batch}
    return batch, shapes, height, width


def export_controlnet(module: torch.nn.Module, path: Path) -> ControlNetSignature:
    """Write ``module`` (a diffusers ``ControlNetModel``) as ONNX at ``path``, fp32, dynamic shapes."""
    signature = ControlNetSignature.of(module)
    batch, shapes, h, w = _dims(signature.unet)
    side = signature.unet.multiple * signature.cond_scale
    ordered = [shapes["sample"], shapes["timestep"], shapes["encoder_hidden_states"]]
    ordered.append({0: batch, 2: side * h, 3: side * w})
    added = [shapes["text_embeds"], shapes["time_ids"]] if signature.unet.text_embeds_dim else []
    inputs = controlnet_inputs(signature, 2, 5, 7)  # distinct sizes: no 0/1 specialisation
    dynamic = (*ordered, tuple(added)) if added else tuple(ordered)  # *added: one tuple, when present
    _save(_ControlNetGraph(cpu_fp32(module)).eval(), inputs, path, signature.input_names(),
          signature.residuals.names, dynamic)  # fmt: skip
    return signature


def export_residual_unet(module: torch.nn.Module, path: Path) -> tuple[UNetSignature, Residuals]:
    """Write a Stable Diffusion U-Net taking ControlNet residuals (``down_*``, ``mid``) as ONNX at ``path``."""
    signature, residuals = UNetSignature.of(module), Residuals.of(module.config)
    if not signature.context_dim:
        raise ModelError("ControlNet residual inputs need a text-conditioned U-Net", "use --backend torch")
    batch, shapes, h, w = _dims(signature)
    m = signature.multiple
    extra = [{0: batch, 2: (m // d) * h, 3: (m // d) * w} for _, d in (*residuals.down, residuals.mid)]
    head = [shapes[name] for name in signature.input_names()[:3]]
    rest = ([shapes["text_embeds"], shapes["time_ids"]] if signature.text_embeds_dim else []) + extra
    inputs = residual_unet_inputs(signature, residuals, 2, 5, 7)
    names = [*signature.input_names(), *residuals.names]
    graph = _ResidualUNetGraph(cpu_fp32(module), bool(signature.text_embeds_dim)).eval()
    _save(graph, inputs, path, names, ["out"], (*head, tuple(rest)))
    return signature, residuals


def _save(graph: Any, inputs: Sequence[Any], path: Path, names: list[str], outputs: list[str], dynamic: Any) -> None:
    with torch.no_grad():
        program = torch.onnx.export(
            graph, tuple(inputs), dynamo=True, opset_version=OPSET, input_names=names, output_names=outputs,
            dynamic_shapes=dynamic, verbose=False,
        )  # fmt: skip
    program.save(str(path))


def validate(graph_module: torch.nn.Module, path: Path, make_inputs: Any, names: list[str]) -> dict[str, Any]:
    """ONNX Runtime against PyTorch on fresh inputs at :data:`VALIDATION_SHAPES`; raise if over tolerance."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {"tolerance": TOLERANCE["fp32"], "shapes": []}
    for i, (batch, h, w) in enumerate(VALIDATION_SHAPES):
        inputs = make_inputs(batch, h, w, 100 + i)
        with torch.no_grad():
            expected = graph_module(*inputs)
        expected = [t.numpy() for t in (expected if isinstance(expected, tuple) else (expected,))]
        actual = session.run(None, {name: t.numpy() for name, t in zip(names, inputs, strict=True)})
        relative = max(
            float(abs(a - e).max()) / max(float(abs(e).max()), 1e-6) for a, e in zip(actual, expected, strict=True)
        )
        if not all(np.isfinite(a).all() for a in actual):
            relative = float("inf")
        report["shapes"].append({"shape": list(inputs[0].shape), "relative_error": relative})
    worst = max(s["relative_error"] for s in report["shapes"])
    report["max_relative_error"] = worst
    if worst > TOLERANCE["fp32"]:
        raise ModelError(
            f"the ONNX export differs from PyTorch by {worst:.2e} (relative), over the tolerance "
            f"{TOLERANCE['fp32']:.0e}",
            "report this model; use --backend torch meanwhile",
        )
    return report


def export_and_validate(controlnet: torch.nn.Module, unet: torch.nn.Module, folder: Path) -> dict[str, Any]:
    """Both graphs into ``folder`` (``controlnet.onnx``, ``unet_residuals.onnx``), each validated."""
    folder.mkdir(parents=True, exist_ok=True)
    cn_signature = export_controlnet(controlnet, folder / "controlnet.onnx")
    unet_signature, residuals = export_residual_unet(unet, folder / "unet_residuals.onnx")
    if residuals != cn_signature.residuals:
        raise ModelError("the ControlNet's residuals do not fit this U-Net", "use a ControlNet of the model's family")
    cn_graph = _ControlNetGraph(cpu_fp32(controlnet)).eval()
    unet_graph = _ResidualUNetGraph(cpu_fp32(unet), bool(unet_signature.text_embeds_dim)).eval()
    return {
        "controlnet": validate(
            cn_graph, folder / "controlnet.onnx", lambda *a: controlnet_inputs(cn_signature, *a),
            cn_signature.input_names(),
        ),
        "unet_residuals": validate(
            unet_graph, folder / "unet_residuals.onnx", lambda *a: residual_unet_inputs(unet_signature, residuals, *a),
            [*unet_signature.input_names(), *residuals.names],
        ),
    }  # fmt: skip


def residual_inputs(
    residuals: Residuals, cond: Mapping[str, Any], sample: torch.Tensor, device: Any
) -> dict[str, torch.Tensor]:
    """The residual U-Net's ``down_*`` and ``mid`` inputs from a denoiser call's conditioning, as contiguous
    fp32 tensors on ``device``: zeros on steps where no ControlNet acts (adding zeros changes nothing)."""
    down, mid = cond.get("down_block_additional_residuals"), cond.get("mid_block_additional_residual")
    batch, _, height, width = sample.shape
    shapes = residuals.shapes(batch, height, width)
    given = [*down, mid] if down is not None else [None] * len(shapes)
    if len(given) != len(shapes):
        raise ParameterError(
            f"the U-Net takes {len(shapes)} ControlNet residuals, got {len(given)}", "use a ControlNet of its family"
        )
    inputs = {}
    for name, shape, tensor in zip(residuals.names, shapes, given, strict=True):
        if tensor is None:
            tensor = torch.zeros(shape, device=device)
        elif tuple(tensor.shape) != shape:
            raise ParameterError(f"ControlNet residual {name} is {list(tensor.shape)}, the U-Net takes {list(shape)}",
                                 "use a ControlNet of the model's family")  # fmt: skip
        inputs[name] = tensor.to(device, torch.float32).contiguous()
    return inputs


def _components(module: torch.nn.Module, model_id: str, graph: str, signature: Any) -> dict[str, Any]:
    import onnx
    import onnxruntime

    dtype = str(next(module.parameters()).dtype).replace("torch.", "")  # the weights as loaded (fp16 rounds)
    return {
        "weights": model_id or weights_hash(module),
        "dtype": dtype,
        "graph": graph,
        "precision": "fp32",
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "signature": dataclasses.asdict(signature),
        "format": 1,
    }


def cached_controlnet(
    module: torch.nn.Module, model_id: str = "", cache: ArtifactCache | None = None
) -> tuple[Entry, ControlNetSignature]:
    """The validated ONNX export of a ControlNet (``model.onnx``) from the cache, exported on first use."""
    signature = ControlNetSignature.of(module)
    components = _components(module, model_id, "controlnet", signature)

    def build(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        export_controlnet(module, folder / MODEL_FILE)
        graph = _ControlNetGraph(cpu_fp32(module)).eval()
        report = validate(graph, folder / MODEL_FILE, lambda *a: controlnet_inputs(signature, *a),
                          signature.input_names())  # fmt: skip
        return {"validation": report, "seconds": round(time.perf_counter() - started, 2)}

    name = f"controlnet-{components['weights'][:12]}-fp32"
    return (cache or ArtifactCache()).get_or_build("onnx", name, components, build), signature


def cached_residual_unet(
    module: torch.nn.Module, model_id: str = "", cache: ArtifactCache | None = None
) -> tuple[Entry, UNetSignature, Residuals]:
    """The validated ONNX export of a U-Net taking ControlNet residuals (``model.onnx``), cached like the U-Net's."""
    signature, residuals = UNetSignature.of(module), Residuals.of(module.config)
    components = _components(module, model_id, "unet-residuals", signature) | {"residuals": residuals.names}

    def build(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        export_residual_unet(module, folder / MODEL_FILE)
        graph = _ResidualUNetGraph(cpu_fp32(module), bool(signature.text_embeds_dim)).eval()
        report = validate(graph, folder / MODEL_FILE, lambda *a: residual_unet_inputs(signature, residuals, *a),
                          [*signature.input_names(), *residuals.names])  # fmt: skip
        return {"validation": report, "seconds": round(time.perf_counter() - started, 2)}

    name = f"unet-residuals-{components['weights'][:12]}-fp32"
    return (cache or ArtifactCache()).get_or_build("onnx", name, components, build), signature, residuals
