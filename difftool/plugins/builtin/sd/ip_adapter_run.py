"""IP-Adapter at run time (plain, Plus, Plus Face, Full Face) on Stable Diffusion U-Nets.

The adapter's files are read in the original layout (``image_proj.*``, ``ip_adapter.N.to_k_ip/to_v_ip``)
and converted by diffusers' own ``UNet2DConditionModel`` methods; its cross-attention processors are
diffusers' ``IPAdapterAttnProcessor2_0``. They are set on the model's U-Net for one task run only
(:func:`attached`) and the U-Net's own processors put back after it, so the cached model serves runs
without a reference unchanged.

The reference images are encoded once per job (and kept for the next job with the same files), and
projected to image tokens once: the tokens ride on the text conditioning (appended to
``encoder_hidden_states``) through :class:`ReferencedDenoiser`, which the processors split off again,
as diffusers' ``IPAdapterAttnProcessor2_0`` does for a single tensor. ``reference_mode`` picks the
blocks (InstantStyle): ``style`` the first up block's middle attention, ``composition`` the deepest
down block's second one (SDXL: ``up.block_0`` and ``down.block_2``, as diffusers documents).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from difftool.core.denoiser import Conditioning, Denoiser
from difftool.core.errors import ModelError, ParameterError
from difftool.core.images import LoadedImage
from difftool.core.runtime import current
from difftool.core.task import RunContext
from difftool.plugins.builtin.sd.ip_adapter_files import (
    adapter_kind,
    encoder_width,
    find_encoder,
    load_encoder,
    read_adapter,
    reference_files,
    resolve_adapter,
)

#: Encoded references kept between jobs (each a few kB of tokens).
KEPT = 8


def instant_style(unet: Any, mode: str, weight: float) -> float | dict[str, Any]:
    """diffusers' ``set_ip_adapter_scale`` argument for ``mode``: the weight, or InstantStyle's block dict.

    The blocks are found from the U-Net's layout: the first up block with attention (SDXL ``block_0``,
    SD 1.x ``block_1``) carries style, the deepest down block with attention (SDXL ``block_2``) layout.
    """
    if mode == "all":
        return weight
    config = unet.config
    layers = int(config.layers_per_block if isinstance(config.layers_per_block, int) else config.layers_per_block[0])
    if mode == "style":
        block = next(i for i, kind in enumerate(config.up_block_types) if "CrossAttn" in kind)
        scales = [0.0] * (layers + 1)
        scales[1] = weight
        return {"up": {f"block_{block}": scales}}
    block = max(i for i, kind in enumerate(config.down_block_types) if "CrossAttn" in kind)
    scales = [0.0] * layers
    scales[min(1, layers - 1)] = weight
    return {"down": {f"block_{block}": scales}}


def _split_processor_class() -> type:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    class SplitIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
        """diffusers' processor, splitting the image tokens off the end of the conditioning itself (the
        same split as its deprecated single-tensor path, without the warning on every call)."""

        def __call__(self, attn: Any, hidden_states: Any, encoder_hidden_states: Any = None, *a: Any, **k: Any) -> Any:
            if encoder_hidden_states is not None and not isinstance(encoder_hidden_states, tuple):
                end = encoder_hidden_states.shape[1] - self.num_tokens[0]
                encoder_hidden_states = (encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]])
            return super().__call__(attn, hidden_states, encoder_hidden_states, *a, **k)

    return SplitIPAdapterAttnProcessor


class Adapter:
    """An IP-Adapter converted for one U-Net: its attention processors and image projection."""

    def __init__(self, path: Path, state: dict[str, dict[str, Any]], unet: Any, model_name: str) -> None:
        import torch

        self.path, self.kind = path, adapter_kind(state, path)
        width = unet.config.cross_attention_dim
        keys = sorted(k for k in state["ip_adapter"] if k.endswith(".to_k_ip.weight"))
        theirs = int(state["ip_adapter"][keys[0]].shape[1]) if keys else None
        crossing = [n for n in unet.attn_processors if not n.endswith("attn1.processor")]
        if theirs != width or len(keys) != len(crossing):
            raise ModelError(
                f"IP-Adapter {path.name} does not fit model {model_name}: it is for a U-Net with {len(keys)} "
                f"cross-attention layers {theirs} wide ({_family_of(theirs)}), the model has {len(crossing)} "
                f"{width} wide ({_family_of(width)})",
                "use an IP-Adapter made for this model's family",
            )
        dtype, device = unet.dtype, unet.device
        processors = unet._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)
        split = _split_processor_class()
        for processor in processors.values():
            if isinstance(processor, torch.nn.Module):
                processor.to(device=device, dtype=dtype).requires_grad_(False)
                if type(processor).__name__ == "IPAdapterAttnProcessor2_0":
                    processor.__class__ = split
        self.processors = processors
        projection = unet._convert_ip_adapter_image_proj_to_diffusers(state["image_proj"], low_cpu_mem_usage=False)
        self.projection = projection.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.hidden_states = self.kind != "plain"  # diffusers: not isinstance(layer, ImageProjection)
        self.width = _needed_width(state, self.kind)
        self.sha256 = checkpoint_hash(path)


def _family_of(width: int | None) -> str:
    return {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}.get(width or 0, "unknown family")


def _needed_width(state: dict[str, dict[str, Any]], kind: str) -> int:
    proj = state["image_proj"]
    if kind == "plain":
        return int(proj["proj.weight"].shape[1])
    if kind == "full":
        return int(proj["proj.0.weight"].shape[1])
    return int(proj["proj_in.weight"].shape[1])


def checkpoint_hash(path: Path) -> str:
    from difftool.core.atomic import file_sha256

    return file_sha256(path)


def _adapter_for(path: Path, model: Any, context: RunContext, allow_pickle: bool) -> Adapter:
    key = (str(path.resolve()), path.stat().st_mtime_ns, id(model.unet), context.dtype, context.device)
    cache: dict[Any, Adapter] = current().cache("sd-ip-adapters", dict)
    if key not in cache:
        cache.clear()  # one adapter at a time: they hold a U-Net's worth of processors
        cache[key] = Adapter(path, read_adapter(path, allow_pickle), model.unet, model.name)
    return cache[key]


def _encoder_for(path: Path, context: RunContext) -> Any:
    import torch

    key = (str(path.resolve()), path.stat().st_mtime_ns, context.device)
    cache: dict[Any, Any] = current().cache("sd-image-encoders", dict)
    if key not in cache:
        cache.clear()
        encoder = load_encoder(path)
        cache[key] = torch.nn.Module.to(encoder, device=context.torch_device, dtype=torch.float32).eval()
    return cache[key]


def encode(encoder: Any, images: list[Any], hidden_states: bool) -> tuple[Any, Any]:
    """(reference, unconditional) embeddings as diffusers' ``encode_image`` makes them, averaged over
    ``images``: the projected image embeds (plain; unconditional zeros) or the penultimate hidden states
    (Plus; unconditional: a black image's)."""
    import torch
    from transformers import CLIPImageProcessor

    side = int(encoder.config.image_size)
    processor = CLIPImageProcessor(size=side, crop_size=side)  # as diffusers' load_ip_adapter makes it
    pixels = processor(images, return_tensors="pt").pixel_values
    first = next(encoder.parameters())
    pixels = pixels.to(first.device, first.dtype)
    with torch.inference_mode():
        if hidden_states:
            embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2].mean(0, keepdim=True)
            uncond = encoder(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
        else:
            embeds = encoder(pixels).image_embeds.mean(0, keepdim=True)
            uncond = torch.zeros_like(embeds)
    return embeds.float(), uncond.float()


def reference_images(files: Sequence[Any]) -> list[Any]:
    """The references as RGB images: a file decoded as difftool opens any image (its size checked before
    decoding), an image a server decoded from a request as it is."""
    from difftool.core.images import open_image

    return [(f if isinstance(f, LoadedImage) else open_image(f)).to_pil().convert("RGB") for f in files]


def reference_names(files: Sequence[Any]) -> list[str]:
    """What a record says of the references: file names only (never a path), ``<image>`` for one sent inline."""
    return [f.name if isinstance(f, Path) else "<image>" for f in files]


def reference_identity(source: Any) -> tuple[str, Any]:
    """What tells a reference apart for the cache: a file's path and time, an in-memory image's pixels."""
    if isinstance(source, Path):
        return (str(source), source.stat().st_mtime_ns)
    import hashlib

    return ("<image>", hashlib.sha256(source.rgb.tobytes()).hexdigest())


class Reference:
    """A reference ready for sampling: its image tokens (reference and unconditional) and the adapter."""

    def __init__(self, adapter: Adapter, tokens: Any, uncond: Any, record: dict[str, Any], unit: str = "") -> None:
        self.adapter, self.tokens, self.uncond, self.record = adapter, tokens, uncond, record
        self.unit = unit  # A1111's ``ControlNet N`` text for it (:func:`a1111_unit`)


def prepare(params: Mapping[str, Any], model: Any, context: RunContext) -> Reference | None:
    """The request's reference encoded and projected (once per job), or ``None`` without one."""
    import torch

    if not params["reference"]:
        return None
    if context.backend_name != "torch":
        raise ParameterError("--reference (IP-Adapter) runs on the torch backend only", "pass --backend torch")
    allow_pickle = bool(params["allow_pickle"])
    path = resolve_adapter(str(params["ip_adapter"]), context)
    adapter = _adapter_for(path, model, context, allow_pickle)
    encoder_path = find_encoder(path, adapter.width, adapter.hidden_states, params["image_encoder"])
    files = reference_files(params["reference"])
    key = (adapter.sha256, str(encoder_path), tuple(reference_identity(f) for f in files), context.device)
    cache: dict[Any, tuple[Any, Any]] = current().cache("sd-ip-adapter-references", dict)
    if key not in cache:
        encoder = _encoder_for(encoder_path, context)
        if encoder_width(encoder, adapter.hidden_states) != adapter.width:
            raise ModelError(
                f"IP-Adapter {path.name} needs an image encoder {adapter.width} wide; {encoder_path.name} is "
                f"{encoder_width(encoder, adapter.hidden_states)} wide",
                "pass the encoder the adapter was trained with as --image-encoder",
            )
        images = reference_images(files)
        embeds, uncond = encode(encoder, images, adapter.hidden_states)
        with torch.inference_mode():  # projected once here, not by the U-Net at every step
            cache[key] = (adapter.projection(embeds), adapter.projection(uncond))
        while len(cache) > KEPT:
            del cache[next(iter(cache))]
    tokens, uncond_tokens = cache[key]
    record = {
        "reference": reference_names(files),
        "ip_adapter": path.stem,
        "ip_adapter_hash": adapter.sha256[:10],
        "image_encoder": encoder_path.stem if encoder_path.is_file() else encoder_path.name,
        "reference_weight": float(params["reference_weight"]),
        "reference_mode": str(params["reference_mode"]),
    }
    return Reference(adapter, tokens, uncond_tokens, record, a1111_unit(model, adapter, record))


def a1111_unit(model: Any, adapter: Adapter, record: Mapping[str, Any]) -> str:
    """The reference as A1111's ControlNet extension records an IP-Adapter unit (``Module: ip-adapter_clip_sd15,
    Model: ip-adapter_sd15 [hash], Weight: 0.6, ...``); a mode other than ``all`` adds ``Reference Mode``,
    which the extension does not have. The reference image itself is not recorded (A1111 records none)."""
    from difftool.core.metadata import controlnet_text

    module = "ip-adapter_clip_sd15"
    if model.family.xl:  # the encoder the adapter needs: ViT-H (1024 projected, 1280 hidden) or ViT-bigG
        vith = adapter.width == (1280 if adapter.hidden_states else 1024)
        module = "ip-adapter_clip_sdxl_plus_vith" if vith else "ip-adapter_clip_sdxl"
    name = f"{record['ip_adapter']} [{adapter.sha256[:8]}]"
    text = controlnet_text(module, name, float(record["reference_weight"]), 0.0, 1.0, False)
    mode = record["reference_mode"]
    return text if mode == "all" else f"{text}, Reference Mode: {mode}"


@contextmanager
def attached(params: Mapping[str, Any], model: Any, context: RunContext) -> Iterator[Reference | None]:
    """The reference's processors set on ``model``'s U-Net (with its block scales) for the ``with`` body,
    the U-Net's own put back after it; the reference recorded in the run's notes."""
    from types import SimpleNamespace

    from diffusers.loaders.ip_adapter import IPAdapterMixin

    reference = prepare(params, model, context)
    if reference is None:
        yield None
        return
    unet = model.unet
    own = dict(unet.attn_processors)
    unet.set_attn_processor(dict(reference.adapter.processors))  # set_attn_processor pops from its argument
    scale = instant_style(unet, str(params["reference_mode"]), float(params["reference_weight"]))
    IPAdapterMixin.set_ip_adapter_scale(SimpleNamespace(unet=unet), scale)  # diffusers' InstantStyle expansion
    unet._difftool_reference = reference
    # Sliced attention (the out-of-memory retry) would replace the adapter's processors and read the image
    # tokens as text: refuse it in one line instead of making a wrong image.
    unet.set_attention_slice = _no_slicing
    context.notes.update(reference.record)
    try:
        yield reference
        # After the run: its ControlNet units (if any) recorded theirs; the reference is the last unit.
        context.notes["controlnet"] = [*context.notes.get("controlnet", ()), reference.unit]
    finally:
        del unet._difftool_reference, unet.set_attention_slice
        unet.set_attn_processor(own)


def _no_slicing(*_: Any) -> None:
    raise ModelError(
        "out of memory in the U-Net with a reference image (IP-Adapter has no sliced attention)",
        "use a smaller --width/--height or --dtype bf16",
    )


class ReferencedDenoiser(Denoiser):
    """``inner`` (the U-Net) with the reference's image tokens appended to the text conditioning.

    ``guided``: the sampler batches unconditional and conditional halves; each gets its own tokens
    (diffusers' ``torch.cat([negative_image_embeds, image_embeds])``).
    """

    def __init__(self, inner: Denoiser, reference: Reference, guided: bool) -> None:
        self.inner, self.reference, self.guided = inner, reference, guided
        for name in ("sample_channels", "in_channels", "prediction_type", "dtype", "device", "backend"):
            setattr(self, name, getattr(inner, name))

    def __call__(self, sample: Any, timestep: Any, cond: Conditioning) -> Any:
        import torch

        text = cond["encoder_hidden_states"]
        ref = self.reference
        tokens = torch.cat([ref.uncond, ref.tokens]) if self.guided else ref.tokens
        tokens = tokens.to(text.device, text.dtype).repeat(text.shape[0] // tokens.shape[0], 1, 1)
        return self.inner(sample, timestep, {**cond, "encoder_hidden_states": torch.cat([text, tokens], dim=1)})
