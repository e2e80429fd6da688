"""``style``'s presets: a prompt template and a negative prompt per named style."""

from __future__ import annotations

from typing import Any

from difftool.core.errors import ParameterError

#: ``--style`` presets: (prompt template, negative prompt). ``{}`` is the user's ``--prompt``.
STYLE_PRESETS: dict[str, tuple[str, str]] = {
    "oil painting": (
        "an oil painting of {}, thick impasto brush strokes, canvas texture, rich colours",
        "photo, photograph, smooth, blurry",
    ),
    "watercolor": (
        "a watercolor painting of {}, soft washes, wet-on-wet, paper texture, light colours",
        "photo, photograph, harsh lines, oversaturated",
    ),
    "ink sketch": (
        "an ink sketch of {}, black pen lines, cross-hatching, white paper, monochrome",
        "colour, photo, photograph, blurry",
    ),
    "anime": (
        "anime style illustration of {}, cel shading, clean line art, vibrant colours",
        "photo, photograph, realistic, 3d render",
    ),
}


def style_prompt(style: str | None, prompt: str, reference: Any = ()) -> tuple[str, str]:
    """The prompt and extra negative prompt for a preset (or the user's prompt alone; none with a reference)."""
    if style is None:
        if not prompt and not reference:
            raise ParameterError("style needs --style or --prompt", f"pass --style ({', '.join(STYLE_PRESETS)})")
        return prompt, ""
    template, negative = STYLE_PRESETS[style]
    return template.format(prompt or "the scene"), negative
