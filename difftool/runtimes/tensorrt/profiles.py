"""TensorRT optimization profiles: which input shapes an engine accepts, and choosing one per call.

Pure Python (no TensorRT import), tested everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from difftool.core.errors import ParameterError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Profile:
    """An optimization profile: per input name, the (min, opt, max) shapes the engine accepts."""

    shapes: Mapping[str, tuple[Shape, Shape, Shape]]

    def covers(self, request: Mapping[str, Shape]) -> bool:
        for name, shape in request.items():
            if name not in self.shapes:
                return False
            low, _, high = self.shapes[name]
            if len(shape) != len(low) or any(s < lo or s > hi for s, lo, hi in zip(shape, low, high, strict=True)):
                return False
        return True

    def as_json(self) -> dict[str, list[list[int]]]:
        return {name: [list(s) for s in triple] for name, triple in sorted(self.shapes.items())}


def unet_profile(
    in_channels: int, multiple: int, batch: tuple[int, int, int], size: tuple[int, int, int], class_labels: bool
) -> Profile:
    """A profile for a pixel U-Net: ``batch`` and square ``size`` as (min, opt, max), sizes in pixels."""

    def sample(b: int, s: int) -> Shape:
        s = max(multiple, s // multiple * multiple)
        return (b, in_channels, s, s)

    shapes: dict[str, tuple[Shape, Shape, Shape]] = {
        "sample": (sample(batch[0], size[0]), sample(batch[1], size[1]), sample(batch[2], size[2])),
        "timestep": ((batch[0],), (batch[1],), (batch[2],)),
    }
    if class_labels:
        shapes["class_labels"] = ((batch[0],), (batch[1],), (batch[2],))
    return Profile(shapes)


def signature_profile(
    signature: Any,
    batch: tuple[int, int, int],
    size: tuple[int, int, int],
    tokens: tuple[int, int, int] = (77, 77, 77),
) -> Profile:
    """A profile for every input of an exported U-Net (:class:`~difftool.exporters.onnx.UNetSignature`).

    ``size`` is the square sample size in the U-Net's own units (pixels for pixel models, latent
    cells for Stable Diffusion: 512 px is 64), as (min, opt, max); ``tokens`` the text length.
    """
    profile = unet_profile(signature.in_channels, signature.multiple, batch, size, signature.class_labels)
    shapes = dict(profile.shapes)
    if signature.context_dim:
        shapes["encoder_hidden_states"] = tuple(
            (b, t, signature.context_dim) for b, t in zip(batch, tokens, strict=True)
        )  # type: ignore[assignment]
    if signature.text_embeds_dim:
        shapes["text_embeds"] = tuple((b, signature.text_embeds_dim) for b in batch)  # type: ignore[assignment]
        shapes["time_ids"] = tuple((b, signature.time_ids) for b in batch)  # type: ignore[assignment]
    return Profile(shapes)


def controlnet_profiles(
    signature: Any, batch: tuple[int, int, int], size: tuple[int, int, int], tokens: tuple[int, int, int] = (77, 77, 77)
) -> tuple[Profile, Profile]:
    """Profiles for a ControlNet export and its residual-input U-Net
    (:mod:`difftool.exporters.onnx_controlnet`) over the same requests: ``size`` in latent cells.

    ``signature`` is a :class:`~difftool.exporters.onnx_controlnet.ControlNetSignature`; the control
    image is ``cond_scale`` times the sample's side, each residual the sample's side over its downscale.
    """
    shared = signature_profile(signature.unet, batch, size, tokens)
    sides = [shape[2] for shape in shared.shapes["sample"]]  # rounded to the U-Net's multiple
    scale = signature.cond_scale
    image = tuple((b, signature.cond_channels, s * scale, s * scale) for b, s in zip(batch, sides, strict=True))
    controlnet = Profile({**shared.shapes, "controlnet_cond": image})  # type: ignore[dict-item]
    return controlnet, residual_profile(signature.unet, signature.residuals, batch, size, tokens)


def residual_profile(
    signature: Any,
    residuals: Any,
    batch: tuple[int, int, int],
    size: tuple[int, int, int],
    tokens: tuple[int, int, int] = (77, 77, 77),
) -> Profile:
    """The residual-input U-Net's profile (:func:`controlnet_profiles`' second) from the U-Net's own
    :class:`~difftool.exporters.onnx.UNetSignature` and :class:`~difftool.exporters.onnx_controlnet.Residuals`."""
    shared = signature_profile(signature, batch, size, tokens)
    sides = [shape[2] for shape in shared.shapes["sample"]]
    extra = {
        name: tuple((b, channels, s // down, s // down) for b, s in zip(batch, sides, strict=True))
        for name, (channels, down) in zip(residuals.names, (*residuals.down, residuals.mid), strict=True)
    }
    return Profile({**shared.shapes, **extra})  # type: ignore[dict-item]


#: Stable Diffusion's VAE: one latent cell is 8 x 8 pixels.
LATENT_SCALE = 8


def default_sizes(largest: int, latent: bool) -> tuple[int, int, int]:
    """The default (min, opt, max) square side, in the U-Net's units: ``largest`` pixels at most (the
    ``max_size`` option means pixels, latent or not), opt 512 px unless that is above the max."""
    scale = LATENT_SCALE if latent else 1
    high = max(64 // scale, largest // scale)
    return 64 // scale, min(512 // scale, high), high


def control_ranges(shapes: Any, largest: int = 1024) -> tuple[tuple[int, int, int], ...]:
    """(batch, size, tokens) for :func:`controlnet_profiles`: the task's declared shapes, else Stable
    Diffusion's defaults (as :func:`engine_profile`'s); batch from 1 (guess mode halves CFG's batch)."""
    if shapes is None:
        return (1, 2, 4), default_sizes(largest, latent=True), (77, 77, 77)
    return (1, *shapes.batch[1:]), tuple(shapes.size), tuple(shapes.tokens)


def engine_profile(signature: Any, shapes: Any, largest: int = 1024) -> Profile:
    """The profile to build for a request: the task's declared shapes, else a default range.

    ``shapes`` is the task's :class:`~difftool.core.params.ExportShapes` (or ``None``); ``largest`` the
    default maximum image side in pixels (the backend's ``max_size`` option).
    """
    if shapes is not None:
        return signature_profile(signature, shapes.batch, shapes.size, shapes.tokens)
    if signature.context_dim:  # Stable Diffusion: latent cells (pixels / 8), batch 2 for CFG
        return signature_profile(signature, (1, 2, 4), default_sizes(largest, latent=True))
    return signature_profile(signature, (1, 1, 2), default_sizes(largest, latent=False))


#: The text-encoder input whose second dimension is the prompt's length in tokens (77 per chunk).
TEXT_INPUT = "encoder_hidden_states"


def select_profile(profiles: Sequence[Profile], request: Mapping[str, Shape]) -> int:
    """Index of the first profile covering every requested input shape, or a clear error."""
    for index, profile in enumerate(profiles):
        if profile.covers(request):
            return index
    built = "; ".join(
        f"#{i}: " + ", ".join(f"{n} {list(lo)}..{list(hi)}" for n, (lo, _, hi) in p.shapes.items())
        for i, p in enumerate(profiles)
    )
    text = request.get(TEXT_INPUT)
    longest = max((p.shapes[TEXT_INPUT][2][1] for p in profiles if TEXT_INPUT in p.shapes), default=0)
    if text is not None and len(text) == 3 and longest and text[1] > longest:
        # the prompt, not the image: a smaller tile or max_size would change nothing
        raise ParameterError(
            f"the prompt is {text[1]} tokens and this TensorRT engine takes at most {longest} "
            f"(engine built for {built})",
            f"shorten the prompt (or its negative) to {longest // 77} chunk(s) of 75 tokens",
        )
    wanted = ", ".join(f"{name} {list(shape)}" for name, shape in request.items())
    raise ParameterError(
        f"no TensorRT profile covers {wanted} (engine built for {built})",
        "use a smaller --tile, or rebuild the engine with a larger profile (--backend-opt max_size=N)",
    )


def is_static(profiles: Sequence[Profile]) -> bool:
    """Whether every profile fixes each input's shape (min == max): CUDA graphs then pay off at once."""
    return all(low == high for p in profiles for low, _, high in p.shapes.values())
