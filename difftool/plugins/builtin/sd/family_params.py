"""Parameters ``generate`` and ``style`` declare for the flow-matching families (SD3, Flux: the flow plugin
reads them); a Stable Diffusion run refuses them when set, rather than ignoring them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from difftool.core.errors import ParameterError
from difftool.core.params import Param

FLOW_PARAMS = (
    Param("shift", "float", default=None, min=0.05, max=20.0,
          help="SD3 / Flux: the flow schedule's shift (default: the model's; Flux dev's follows the image size)"),
    Param("true_cfg", "float", default=None, min=1.0, max=50.0,
          help="Flux: true CFG with the negative prompt, a second model pass per step (off by default; "
          "--guidance-scale is Flux's distilled guidance)"),
)  # fmt: skip


def refuse_flow_params(params: Mapping[str, Any]) -> None:
    """One-line refusal of a flow-only parameter set for a Stable Diffusion model."""
    for param in FLOW_PARAMS:
        if params[param.name] is not None:
            flag = "--" + param.name.replace("_", "-")
            raise ParameterError(f"{flag} is for SD3 / Flux models only", f"drop {flag} for this model")
