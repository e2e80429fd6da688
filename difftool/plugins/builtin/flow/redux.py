"""Flux Redux: style and content from a reference image for Flux.1 dev and schnell (``--reference``).

What diffusers' ``FluxPriorReduxPipeline`` does, done here once per job: each reference is encoded by a
SigLIP vision model (transformers' ``SiglipVisionModel``, its ``last_hidden_state``), projected to T5-wide
tokens by the Redux projector (diffusers' ``ReduxImageEncoder``: ``redux_up`` -> SiLU -> ``redux_down``)
and the tokens are appended to the prompt's T5 embeddings; the transformer reads them as more text.

Several references: diffusers' prior weighs each image's (text + image) embeddings by its
``prompt_embeds_scale`` and the pooled one by its ``pooled_prompt_embeds_scale`` and sums over the images;
difftool's are ``1 / n`` for both, so the image tokens are averaged and the prompt stays as written.

``reference_weight`` (the parameter SD's IP-Adapter reads; 1 = Black Forest Labs' and diffusers' Redux
exactly): not a scale on the embeddings. Flux layer-normalises each text token before attention, so
scaling the tokens (``prompt_embeds_scale`` with a prompt, ComfyUI's ``multiply``) barely changes the image
until the weight is 0 (measured on the test model: 0.25 and 1 differ by 4/255; 0 by 26/255). The weight is
``log(w)`` added to the attention logits of the Redux tokens' keys in every block (ComfyUI's "Apply Style
Model" ``attn_bias``; in diffusers: ``FluxPipeline(joint_attention_kwargs={"attention_mask": bias})``):
w < 1 weakens the reference smoothly, 0 removes it (the prompt's image), up to 2 strengthens it.

Files (found as ComfyUI keeps them, or named): the projector ``flux1-redux-dev.safetensors`` (keys
``redux_up.*``, ``redux_down.*``) by ``--ip-adapter``, or the first in ``style_models/`` /
``models/style_models`` under the model roots (or beside the model's ComfyUI ``models/`` folder); a
diffusers FLUX.1-Redux-dev folder (``image_embedder/``, ``image_encoder/``) also serves. The SigLIP
encoder by ``--image-encoder``, else ``image_encoder/`` beside the projector, else the first SigLIP as wide
as the projector in ``clip_vision/`` / ``models/clip_vision`` (``sigclip_vision_patch14_384.safetensors``).

Schnell reads its prompt in 256 T5 tokens (as difftool's Flux schnell always does); diffusers' prior
encodes 512 whatever the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difftool.core.errors import ParameterError
from difftool.core.runtime import current
from difftool.core.task import RunContext
from difftool.plugins.builtin.flow.redux_files import (
    find_encoder,
    load_encoder,
    load_projector,
    projector_folder,
    redux_width,
    resolve_redux,
)
from difftool.plugins.builtin.sd.ip_adapter_files import reference_files

if TYPE_CHECKING:
    from difftool.plugins.builtin.flow.pipeline import Conditioning

#: Encoded references kept between jobs (each n x 4096 floats).
KEPT = 8


def check(params: Mapping[str, Any], model: Any) -> None:
    """Refuse, before any encoding, a reference on a model or in a mode Redux does not run."""
    if not params["reference"]:
        return
    label = model.family.label
    if model.family.arch != "flux":
        raise ParameterError(
            f"--reference is not supported for {label} models (Flux Redux runs on Flux.1 dev and schnell)",
            "drop --reference, or pass a Flux.1 --model",
        )
    if params["reference_mode"] != "all":
        raise ParameterError(
            f"--reference-mode {params['reference_mode']} is not supported for {label} (Redux weighs no blocks apart)",
            "drop --reference-mode (Flux Redux runs as `all`)",
        )


def image_processor(side: int) -> Any:
    """FLUX.1-Redux-dev's ``feature_extractor``: SigLIP's (bicubic resize to the encoder's side, mean and std 0.5).
    The PIL implementation, so the numbers do not depend on whether torchvision is installed."""
    try:
        from transformers import SiglipImageProcessorPil as Processor  # transformers >= 5
    except ImportError:
        from transformers import SiglipImageProcessor as Processor
    return Processor(size={"height": side, "width": side})


def encode(encoder: Any, projector: Any, images: list[Any]) -> Any:
    """The Redux tokens of ``images``, averaged: (1, tokens, T5 width), float32 (diffusers' ``encode_image``
    and ``image_embedder``)."""
    import torch

    side = int(encoder.config.image_size)
    first = next(encoder.parameters())
    pixels = image_processor(side).preprocess(images=images, do_resize=True, return_tensors="pt", do_convert_rgb=True)
    with torch.inference_mode():
        hidden = encoder(pixel_values=pixels.pixel_values.to(first.device, first.dtype)).last_hidden_state
        tokens = projector(hidden.to(next(projector.parameters()).dtype)).image_embeds
    return tokens.float().mean(0, keepdim=True)


class _Parts:
    """A projector and its SigLIP encoder, loaded (kept one pair at a time)."""

    def __init__(self, redux: Path, encoder_path: Path, width: int) -> None:
        from difftool.core.atomic import file_sha256

        self.redux, self.encoder_path = redux, encoder_path
        self.encoder = load_encoder(encoder_path, redux, width).float().eval().requires_grad_(False)
        self.projector = load_projector(redux)
        weights = redux if redux.is_file() else next(iter(sorted(projector_folder(redux).glob("*.safetensors"))), None)
        self.sha256 = file_sha256(weights) if weights else ""


def _parts_for(params: Mapping[str, Any], model: Any) -> _Parts:
    redux = resolve_redux(params["ip_adapter"], model.path)
    width = redux_width(redux, model)
    encoder_path = find_encoder(redux, width, params["image_encoder"], model.path)
    key = (str(redux.resolve()), redux.stat().st_mtime_ns, str(encoder_path.resolve()), encoder_path.stat().st_mtime_ns)
    cache: dict[Any, _Parts] = current().cache("flux-redux", dict)
    if key not in cache:
        cache.clear()
        cache[key] = _Parts(redux, encoder_path, width)
    return cache[key]


def prepare(params: Mapping[str, Any], model: Any, context: RunContext) -> tuple[Any, dict[str, Any]]:
    """The references' Redux tokens (encoded once per job, kept while the files stay the same) and what the
    metadata records of them (the keys SD's IP-Adapter records)."""
    from difftool.plugins.builtin.flow.pipeline import on_device
    from difftool.plugins.builtin.sd.ip_adapter_run import reference_identity, reference_images, reference_names

    parts = _parts_for(params, model)
    files = reference_files(params["reference"])  # paths, or images a server decoded from the request
    key = (parts.sha256, str(parts.encoder_path), tuple(reference_identity(f) for f in files), context.device)
    cache: dict[Any, Any] = current().cache("flux-redux-references", dict)
    if key not in cache:
        images = reference_images(files)
        with on_device(parts.encoder, context) as encoder, on_device(parts.projector, context) as projector:
            cache[key] = encode(encoder, projector, images)
        while len(cache) > KEPT:
            del cache[next(iter(cache))]
    encoder_path = parts.encoder_path
    record = {
        "reference": reference_names(files),
        "ip_adapter": parts.redux.stem if parts.redux.is_file() else parts.redux.name,
        "ip_adapter_hash": parts.sha256[:10],
        "image_encoder": encoder_path.stem if encoder_path.is_file() else encoder_path.name,
        "reference_weight": float(params["reference_weight"]),
        "reference_mode": str(params["reference_mode"]),
    }
    return cache[key], record


def attach(model: Any, text: Conditioning, params: Mapping[str, Any], context: RunContext) -> Conditioning:
    """``text`` with the references' tokens after the prompt's T5 embeddings (diffusers'
    ``torch.cat([prompt_embeds, image_embeds], dim=1)``), their attention weighted by ``reference_weight``;
    ``text`` itself without a reference (and the weighting of an earlier run taken off the cached model)."""
    import math

    import torch

    from difftool.plugins.builtin.flow.pipeline import Conditioning

    weighting = getattr(model.transformer, "_difftool_redux", None)
    if weighting is not None:
        weighting.value, weighting.mask = None, None
    if not params["reference"]:
        return text
    check(params, model)
    tokens, record = prepare(params, model, context)
    context.notes.update(record)
    weight = float(params["reference_weight"])
    if weight == 0.0:  # the limit of a vanishing weight: the tokens take no attention at all
        return text
    states = text.cond["encoder_hidden_states"]
    tokens = tokens.to(states.device, states.dtype).expand(states.shape[0], -1, -1)
    if weight != 1.0:
        weighting = _weighting(model.transformer)
        weighting.value, weighting.active = (states.shape[1], tokens.shape[1], math.log(weight)), False
    return Conditioning({**text.cond, "encoder_hidden_states": torch.cat([states, tokens], dim=1)}, text.uncond,
                        text.guidance_scale)  # fmt: skip


class _Weighting:
    """The current run's (first token, token count, logit bias) for the Redux tokens, or ``None``: one holder
    shared by every processor of a transformer (a copy of the transformer copies it along). ``active``: the
    call's text is that run's (set by the joint blocks, which run before the single ones), so a call with
    other text (another run on the cached model) never takes the bias."""

    value: tuple[int, int, float] | None = None
    active = False
    mask: Any = None


class WeightedProcessor:
    """diffusers' Flux attention processor with ``log(reference_weight)`` added to the attention logits of the
    Redux tokens' keys (ComfyUI's "Apply Style Model" ``attn_bias``), in the joint and the single blocks alike
    (the text, Redux tokens included, comes first in both). Through diffusers' own ``attention_mask`` argument:
    ``FluxPipeline(joint_attention_kwargs={"attention_mask": bias})`` computes the same."""

    def __init__(self, inner: Any, weighting: _Weighting) -> None:
        self.inner, self.weighting = inner, weighting

    def __call__(
        self,
        attn: Any,
        hidden_states: Any,
        encoder_hidden_states: Any = None,
        attention_mask: Any = None,
        image_rotary_emb: Any = None,
    ) -> Any:
        import torch

        weighting = self.weighting
        if weighting.value is not None and attention_mask is None:
            first, count, bias = weighting.value
            if encoder_hidden_states is not None:  # a joint block: the text and the image apart
                weighting.active = encoder_hidden_states.shape[1] == first + count
            total = hidden_states.shape[1] + (0 if encoder_hidden_states is None else encoder_hidden_states.shape[1])
            mask = weighting.mask
            if weighting.active and (mask is None or mask.shape[-1] != total or mask.dtype != hidden_states.dtype
                                     or mask.device != hidden_states.device):  # fmt: skip
                mask = torch.zeros(1, 1, 1, total, device=hidden_states.device, dtype=hidden_states.dtype)
                mask[..., first : first + count] = bias
                weighting.mask = mask
            attention_mask = mask if weighting.active else None
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)


def _weighting(transformer: Any) -> _Weighting:
    """The transformer's holder, its processors wrapped on first use (kept: inert while the holder is empty)."""
    weighting = getattr(transformer, "_difftool_redux", None)
    if weighting is None:
        weighting = _Weighting()
        wrapped = {name: WeightedProcessor(inner, weighting) for name, inner in transformer.attn_processors.items()}
        transformer.set_attn_processor(wrapped)
        transformer._difftool_redux = weighting
    return weighting
