"""Export a diffusers U-Net denoiser to ONNX, validate it against PyTorch, cache it.

Supported: ``UNet2DModel`` (difftool's pixel models) and ``UNet2DConditionModel`` (Stable Diffusion
1.x / 2.x, SDXL with its added conditions, 9-channel inpainting U-Nets). The exported graph takes
the network's full input (noisy sample with the ``concat`` conditioning already attached), one
timestep per sample and, as the model needs, class labels, the text encoder's hidden states
(``encoder_hidden_states``) and SDXL's ``text_embeds`` / ``time_ids``; batch, height, width and
token count are dynamic (height and width in multiples of the U-Net's downsampling). Validation runs
ONNX Runtime and PyTorch on fresh random inputs at two or more shapes and fails the export when the
relative error is over tolerance; the errors go into the cache manifest.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftool.core.denoiser import copied_to
from difftool.core.errors import ModelError, ParameterError
from difftool.exporters.cache import ArtifactCache, Entry
from difftool.exporters.onnx_fp16 import EXTERNAL_DATA_BYTES, activation_peaks, check_fp16_range, to_fp16

OPSET = 18
MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model.opt.onnx"
#: Shapes (batch, height in multiples, width in multiples) the export is validated on: odd sizes too.
VALIDATION_SHAPES = ((1, 9, 13), (2, 4, 6))
#: Relative error allowed against PyTorch fp32: fp16 carries 11 bits of mantissa through ~20 layers.
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
PRECISIONS = tuple(TOLERANCE)
#: Text tokens in example inputs (CLIP's 77); the exported dimension is dynamic.
TOKENS = 77


@dataclass(frozen=True)
class UNetSignature:
    """What the exported graph takes, read from the U-Net's config."""

    in_channels: int
    multiple: int
    class_labels: bool
    out_channels: int = 3
    #: Width of the cross-attention context (text encoder hidden size); 0 for unconditional U-Nets.
    context_dim: int = 0
    #: SDXL: width of the pooled text embedding (``text_embeds``); 0 when the U-Net has no added conditions.
    text_embeds_dim: int = 0
    #: SDXL: number of size/crop conditioning values (``time_ids``).
    time_ids: int = 0

    @classmethod
    def of(cls, module: torch.nn.Module) -> UNetSignature:
        config = getattr(module, "config", None)
        # A U-Net's multiple is its total downsampling; other pixel networks (SRNet) declare theirs.
        declared = getattr(module, "multiple", None)
        if config is None or not (hasattr(config, "down_block_types") or declared):
            raise ModelError(
                f"ONNX export supports diffusers U-Nets, not {type(module).__name__}", "use --backend torch for it"
            )
        base = dict(
            in_channels=int(config.in_channels),
            multiple=int(declared) if declared else 2 ** (len(config.down_block_types) - 1),
            class_labels=bool(getattr(config, "num_class_embeds", None)),
            out_channels=int(config.out_channels),
        )
        if not hasattr(config, "cross_attention_dim"):
            return cls(**base)
        added = getattr(config, "addition_embed_type", None)
        if not isinstance(config.cross_attention_dim, int) or added not in (None, "text_time"):
            raise ModelError(
                f"ONNX export does not support this U-Net's conditioning ({added or 'per-block context'})",
                "use --backend torch for this model",
            )
        if added == "text_time":
            # SDXL: 6 size/crop values; a refiner's loader declares its 5 (size, crop, aesthetic score).
            time_ids = int(getattr(module, "added_time_ids", 6))
            pooled = int(config.projection_class_embeddings_input_dim) - time_ids * int(config.addition_time_embed_dim)
            return cls(**base, context_dim=int(config.cross_attention_dim), text_embeds_dim=pooled, time_ids=time_ids)
        return cls(**base, context_dim=int(config.cross_attention_dim))

    def input_names(self) -> list[str]:
        names = ["sample", "timestep"]
        names += ["class_labels"] if self.class_labels else []
        names += ["encoder_hidden_states"] if self.context_dim else []
        names += ["text_embeds", "time_ids"] if self.text_embeds_dim else []
        return names


class _Graph(torch.nn.Module):
    """The traced call: positional inputs, one tensor out."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return self.module(sample, timestep).sample


class _ClassGraph(_Graph):
    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        return self.module(sample, timestep, class_labels=class_labels).sample


class _TextGraph(_Graph):
    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.module(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample


class _XLGraph(_Graph):
    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.module(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added
        ).sample


def _graph(module: torch.nn.Module, signature: UNetSignature) -> _Graph:
    if signature.text_embeds_dim:
        cls: type[_Graph] = _XLGraph
    elif signature.context_dim:
        cls = _TextGraph
    else:
        cls = _ClassGraph if signature.class_labels else _Graph
    return cls(cpu_fp32(module)).eval()


def cpu_fp32(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` itself if it is fp32 on the CPU, else an fp32 CPU copy: a cached model is never changed."""
    first = next(iter(module.parameters()), None)
    if first is None or (first.dtype == torch.float32 and first.device.type == "cpu"):
        return module
    return copied_to(module, torch.device("cpu"), torch.float32)


def weights_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def example_inputs(signature: UNetSignature, batch: int, h: int, w: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    m = signature.multiple
    # One timestep per sample: servers that batch requests (Triton) stack them like the samples.
    inputs = [
        torch.randn(batch, signature.in_channels, h * m, w * m, generator=g),
        torch.rand(batch, generator=g) * 999,
    ]
    if signature.class_labels:
        inputs.append(torch.zeros(batch, dtype=torch.long))
    if signature.context_dim:
        inputs.append(torch.randn(batch, TOKENS, signature.context_dim, generator=g))
    if signature.text_embeds_dim:
        inputs.append(torch.randn(batch, signature.text_embeds_dim, generator=g))
        size = [h * m * 8, w * m * 8]
        # Original size, crop, target size; a refiner's 5 end with an aesthetic score instead.
        ids = size + [0, 0] + (size if signature.time_ids == 6 else [6.0])
        inputs.append(torch.tensor([ids] * batch, dtype=torch.float32))
    return inputs


def check_channels(signature: UNetSignature, x: torch.Tensor) -> None:
    """Refuse a network input (sample + concat) of the wrong shape with a clear error.

    Otherwise it would surface as a runtime's own message, or TensorRT reading past a buffer.
    """
    if x.dim() != 4 or x.shape[1] != signature.in_channels:
        raise ParameterError(
            f"the exported model takes {signature.in_channels} input channels (sample + concat), got {list(x.shape)}",
            "pass the conditioning this model was exported with",
        )


def check_sides(signature: UNetSignature, x: torch.Tensor) -> None:
    """Refuse a sample whose sides are not multiples of the U-Net's downsampling with a clear error:
    the exported graph's skip connections would not line up (PyTorch's U-Net resizes around that)."""
    m, (height, width) = signature.multiple, x.shape[-2:]
    if height % m or width % m:
        raise ParameterError(
            f"the exported U-Net takes samples whose sides are multiples of {m}, got {width}x{height}",
            f"pick a size whose sides are multiples of {m} in the model's units (latent cells for Stable "
            f"Diffusion: {8 * m} px), or use --backend torch",
        )


def graph_inputs(
    signature: UNetSignature, sample: torch.Tensor, timestep: Any, cond: Mapping[str, Any], device: Any
) -> dict[str, torch.Tensor]:
    """The exported graph's inputs for one denoiser call, by name: contiguous fp32 tensors on ``device``.

    Shared by the runtimes that take tensors by pointer (ONNX Runtime IO binding, TensorRT).
    """

    added = cond.get("added_cond_kwargs") or {}  # SDXL's text_embeds and time_ids

    def needed(name: str) -> torch.Tensor:
        value = added.get(name) if name in ("text_embeds", "time_ids") else cond.get(name)
        if value is None:
            raise ValueError(f"this model needs {name} conditioning")
        return value

    x = sample.to(device, torch.float32)
    if cond.get("concat") is not None:
        x = torch.cat([x, cond["concat"].to(device, torch.float32)], dim=1)
    check_channels(signature, x)
    check_sides(signature, x)
    batch = x.shape[0]
    inputs = {
        "sample": x.contiguous(),
        "timestep": torch.as_tensor(timestep, dtype=torch.float32).to(device).reshape(-1).expand(batch).contiguous(),
    }
    if signature.class_labels:
        labels = needed("class_labels").to(device).long()
        inputs["class_labels"] = (labels.expand(batch) if labels.numel() == 1 else labels).contiguous()
    names = (["encoder_hidden_states"] if signature.context_dim else []) + (
        ["text_embeds", "time_ids"] if signature.text_embeds_dim else []
    )
    for name in names:
        inputs[name] = needed(name).to(device, torch.float32).contiguous()
    return inputs


def export(module: torch.nn.Module, path: Path, precision: str = "fp32") -> UNetSignature:
    """Write ``module`` as an ONNX model at ``path`` with dynamic batch, height and width."""
    if precision not in PRECISIONS:
        raise ModelError(f"ONNX export in {precision} is not supported", f"use one of {', '.join(PRECISIONS)}")
    signature = UNetSignature.of(module)
    graph = _graph(module, signature)
    batch = torch.export.Dim("batch", min=1, max=256)
    height, width = torch.export.Dim("h", min=1, max=2048), torch.export.Dim("w", min=1, max=2048)
    m = signature.multiple
    shapes: dict[str, Any] = {"sample": {0: batch, 2: m * height, 3: m * width}, "timestep": {0: batch}}
    if signature.class_labels:
        shapes["class_labels"] = {0: batch}
    if signature.context_dim:
        shapes["encoder_hidden_states"] = {0: batch, 1: torch.export.Dim("tokens", min=1, max=4096)}
    if signature.text_embeds_dim:
        shapes["text_embeds"] = {0: batch}
        shapes["time_ids"] = {0: batch}
    external = sum(p.numel() * 4 for p in module.parameters()) > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        program = torch.onnx.export(
            graph,
            tuple(example_inputs(signature, 2, 5, 7)),  # distinct sizes: no 0/1 specialisation
            dynamo=True,
            opset_version=OPSET,
            input_names=signature.input_names(),
            output_names=["out"],
            dynamic_shapes=tuple(shapes.values()),
            verbose=False,
        )
    program.save(str(path), external_data=external)  # protobuf cannot hold more than 2 GB in one file
    if precision == "fp16":
        to_fp16(path, external)
    return signature


def validate(module: torch.nn.Module, path: Path, precision: str = "fp32") -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on fresh random inputs at several shapes; raise if over tolerance."""
    import onnxruntime as ort

    signature = UNetSignature.of(module)
    # ONNX Runtime's CPU provider runs fp16 graphs too (it casts around the ops it lacks in fp16).
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    report: dict[str, Any] = {"tolerance": TOLERANCE[precision], "shapes": []}
    for i, (batch, h, w) in enumerate(VALIDATION_SHAPES):
        inputs = example_inputs(signature, batch, h, w, seed=100 + i)
        with torch.no_grad(), activation_peaks(module) as peaks:
            expected = _graph(module, signature)(*inputs).numpy()
        if precision == "fp16":
            check_fp16_range(peaks, list(inputs[0].shape))
        feeds = {name: t.numpy() for name, t in zip(signature.input_names(), inputs, strict=True)}
        actual = session.run(None, feeds)[0]
        if not np.isfinite(actual).all():
            raise ModelError(
                f"the {precision} ONNX export overflows (NaN/Inf at input shape {list(inputs[0].shape)})",
                "export in fp32 (--precision fp32, or --dtype fp32 on the run)",
            )
        max_abs = float(abs(actual - expected).max())
        relative = max_abs / max(float(abs(expected).max()), 1e-6)
        report["shapes"].append({"shape": list(inputs[0].shape), "max_abs_error": max_abs, "relative_error": relative})
    worst = max(s["relative_error"] for s in report["shapes"])
    report["max_relative_error"] = worst
    if worst > TOLERANCE[precision]:
        raise ModelError(
            f"the ONNX export differs from PyTorch by {worst:.2e} (relative), over the tolerance "
            f"{TOLERANCE[precision]:.0e}",
            "report this model; use --backend torch meanwhile",
        )
    return report


def structure_hash(path: Path) -> str:
    """Hash of an ONNX graph without its weight values: exports differing only in weights share it.

    Engines built refittable are keyed by this, so a LoRA or fine-tune of the same architecture refits
    an engine (TensorRT reads the new initializers by name) instead of building one.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    digest = hashlib.sha256()
    for part in [*graph.input, *graph.output, *graph.node]:
        digest.update(part.SerializeToString(deterministic=True))
    for init in graph.initializer:
        digest.update(f"{init.name}:{list(init.dims)}:{init.data_type};".encode())
    return digest.hexdigest()[:16]


def save_optimized(model: Path, target: Path) -> bool:
    """Save ONNX Runtime's graph-optimised model beside ``model``, so later sessions skip those passes.

    Only the "extended" level is saved (operator fusions, no CPU-specific layouts), which stays valid
    on any machine with this ONNX Runtime version (part of the cache key). Skipped for models with
    external data (their optimised copy would need its own data file).
    """
    import onnxruntime as ort

    if any(model.parent.glob("*.data")):
        return False
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return target.is_file()


#: Set on a U-Net by the Stable Diffusion loader when LoRAs are fused into it: its checkpoint's hash.
LORA_BASE = "difftool_lora_base"


def lora_base(module: torch.nn.Module) -> str | None:
    """The checkpoint hash a LoRA-fused U-Net came from (:data:`LORA_BASE`), or ``None``."""
    base = getattr(module, LORA_BASE, None)
    return str(base) if base else None


def cached_export(
    module: torch.nn.Module, name: str, precision: str = "fp32", model_id: str = "", cache: ArtifactCache | None = None
) -> Entry:
    """The validated ONNX export of ``module`` from the cache, exported on first use.

    A LoRA-fused U-Net (:func:`lora_base`) is exported as ``unet-<base>-lora``: each LoRA combination
    is a whole U-Net (3.4 GB for SD 1.5), so the export of a new combination replaces the previous one
    of the same checkpoint (and precision), never the checkpoint's own export.
    """
    from difftool.exporters.cache import VERSIONS
    from difftool.exporters.refit_map import write_weight_map

    base = lora_base(module)
    replaces = VERSIONS
    if base:
        name, replaces = f"unet-{base[:12]}-lora", VERSIONS | {"weights"}
    components = export_components(module, precision, model_id)

    def build(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        export(module, folder / MODEL_FILE, precision)
        report = validate(module, folder / MODEL_FILE, precision)
        optimized = save_optimized(folder / MODEL_FILE, folder / OPTIMIZED_FILE)
        write_weight_map(module, folder / MODEL_FILE)  # a LoRA of it then refits an engine by name
        return {"validation": report, "seconds": round(time.perf_counter() - started, 2), "optimized": optimized}

    return (cache or ArtifactCache()).get_or_build("onnx", f"{name}-{precision}", components, build, replaces)


def export_components(module: torch.nn.Module, precision: str, model_id: str = "") -> dict[str, Any]:
    """The cache-key components of ``module``'s export: its weights, and what decides the graph."""
    import onnx
    import onnxruntime

    base = lora_base(module)
    return {
        "weights": model_id or weights_hash(module),
        "precision": precision,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "signature": UNetSignature.of(module).__dict__,
        "format": 4,  # 2: per-sample timestep input (was one scalar); 3: + saved optimised model; 4: sorted fp16
        **({"lora_of": base} if base else {}),
    }
