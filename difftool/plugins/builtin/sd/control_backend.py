"""ControlNet on a backend: the capability this plugin asks of a backend, declared as a protocol.

Core's backend interface names no model family; a backend that runs ControlNets implements
:class:`ControlNetCapable` (the built-in ``torch``, ``onnx`` and ``tensorrt`` do), and this plugin asks
``isinstance(backend, ControlNetCapable)`` once, at preflight (:func:`capable`), before any model loads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from difftool.core.errors import ParameterError

if TYPE_CHECKING:
    from difftool.core.backend import Backend, DenoiserSpec, ResolvedBackend
    from difftool.core.denoiser import Denoiser
    from difftool.core.params import ExportShapes
    from difftool.core.task import RunContext


class ControlNetRunner(Protocol):
    """``runner(sample, timestep, encoder_hidden_states, controlnet_cond, added_cond_kwargs) -> (down, mid)``:
    a ControlNet's raw residuals (conditioning scale 1, no guess mode); the caller scales them."""

    def __call__(self, sample: Any, timestep: Any, text: Any, image: Any, added: Any) -> tuple[list[Any], Any]: ...


@runtime_checkable
class ControlNetCapable(Protocol):
    """A backend that runs ControlNets: their residuals, and a U-Net that adds them to its skip connections."""

    def make_controlnet(self, module: Any, spec: DenoiserSpec) -> ControlNetRunner:
        """A runner for ``module`` (a diffusers ``ControlNetModel``): its raw residuals on this backend."""
        ...

    def make_residual_denoiser(self, module: Any, spec: DenoiserSpec) -> Denoiser:
        """The U-Net ``module`` taking ControlNet residuals from the conditioning (the keys
        ``down_block_additional_residuals`` and ``mid_block_additional_residual``, diffusers' names)."""
        ...


def refused(name: str) -> ParameterError:
    """The one-line error for ``--control`` on backend ``name``, which runs no ControlNets."""
    return ParameterError(f"ControlNet does not run on --backend {name}", "use --backend torch, onnx or tensorrt")


def capable(resolved: ResolvedBackend) -> ControlNetCapable:
    """``resolved``'s backend as a ControlNet runner, or the one-line error saying it runs none."""
    backend: Backend = resolved.backend
    if not isinstance(backend, ControlNetCapable):
        raise refused(resolved.name)
    return backend


def residual_denoiser(
    context: RunContext, module: Any, *, prediction_type: str, model_id: str = "", shapes: ExportShapes | None = None
) -> Denoiser:
    """The U-Net ``module`` taking ControlNet residuals on the run's backend (recorded with the run's denoisers)."""
    resolved = context.resolved_backend()
    spec = resolved.spec(prediction_type=prediction_type, model_id=model_id, shapes=shapes or context.export_shapes)
    denoiser = capable(resolved).make_residual_denoiser(module, spec)
    context.denoisers.append(denoiser)
    return denoiser


def controlnet_runner(
    context: RunContext, module: Any, *, model_id: str = "", shapes: ExportShapes | None = None
) -> ControlNetRunner:
    """A runner for the ControlNet ``module`` on the run's backend (``model_id``: its weights' hash, keying
    exports; ``shapes``: the U-Net's, else the task's declared ones)."""
    resolved = context.resolved_backend()
    spec = resolved.spec(prediction_type="epsilon", model_id=model_id, shapes=shapes or context.export_shapes)
    return capable(resolved).make_controlnet(module, spec)


class TorchControlNet:
    """A diffusers ``ControlNetModel`` as a :class:`ControlNetRunner` on PyTorch: raw residuals (conditioning
    scale 1, no guess mode) on the module's own device and dtype, as it was loaded."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, sample: Any, timestep: Any, text: Any, image: Any, added: Any) -> tuple[list[Any], Any]:
        import torch

        with torch.inference_mode():
            first = next(self.module.parameters())
            place = {"device": first.device, "dtype": first.dtype}
            kwargs = {"added_cond_kwargs": {k: v.to(**place) for k, v in added.items()}} if added else {}
            t = timestep.to(first.device) if isinstance(timestep, torch.Tensor) else torch.tensor(timestep)
            down, mid = self.module(
                sample.to(**place), t, encoder_hidden_states=text.to(**place), controlnet_cond=image.to(**place),
                conditioning_scale=1.0, guess_mode=False, return_dict=False, **kwargs,
            )  # fmt: skip
        return list(down), mid
