"""A Denoiser that runs a TensorRT engine on CUDA tensors, and the ``tensorrt`` backend's denoiser factory.

Inputs and the output stay on the GPU (bound by pointer, no host copies). With static shapes (or the
backend option ``cuda_graphs=on``) each input shape's launch is captured once in a CUDA graph and
replayed; a capture TensorRT cannot do falls back to direct execution, once and for good, as trtexec does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from difftool.core.cuda import runtime
from difftool.core.denoiser import Denoiser
from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.core.runtime import current
from difftool.exporters.cache import Entry, Recent
from difftool.exporters.onnx import graph_inputs
from difftool.runtimes.tensorrt.engine import ENGINE_FILE, load_weights
from difftool.runtimes.tensorrt.io import EngineIO, _check, aligned, aligned_empty, bind_inputs, bind_outputs
from difftool.runtimes.tensorrt.profiles import Profile, control_ranges, is_static, select_profile

log = logging.getLogger("difftool")


def recent_engines() -> Recent:
    """Recent runners: deserialising (and refitting) an engine costs seconds, so a folder job does it once."""
    return current().cache("tensorrt-engines", lambda: Recent(2))


def engine_denoiser(
    module: Any,
    *,
    prediction_type: str,
    device: str,
    dtype: Any,
    model_id: str,
    options: Mapping[str, Any],
    shapes: Any,
    residuals: bool = False,
) -> TensorRTDenoiser:
    """The ``tensorrt`` backend's denoiser for ``module``: export, build (or reuse) and load its engine.

    ``residuals``: the U-Net taking ControlNet residuals, built from its fp32 export with the profile of
    :func:`~difftool.runtimes.tensorrt.profiles.controlnet_profiles`.
    """
    import tensorrt as trt
    import torch

    from difftool.exporters.onnx import UNetSignature, cached_export, weights_hash
    from difftool.runtimes.tensorrt.engine import (
        BuildOptions,
        cached_engine,
        default_refittable,
        major_version,
        onnx_precision,
        version_tuple,
    )
    from difftool.runtimes.tensorrt.profiles import engine_profile

    signature = UNetSignature.of(module)
    profile = engine_profile(signature, shapes, int(options["max_size"]))
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, "fp16")
    # Stable Diffusion U-Nets meet LoRAs and fine-tunes of one architecture: refit, don't rebuild
    # (except where TensorRT's refittable engines are known to compute wrong output).
    refittable = default_refittable(str(options["refit"]), bool(signature.context_dim), version_tuple(trt))
    major = major_version(trt)
    model_id = model_id or weights_hash(module)  # names the export: unnamed models must not share one
    taken = source = None
    if residuals:  # fp32 exports only: TensorRT 10 lowers them with a precision flag, 11 refuses
        fp32_control_graph(precision, major)
        onnx, taken, profile = residual_unet_export(module, model_id, shapes, int(options["max_size"]))
    else:  # the export of the engine's precision, built strongly typed (fp16: its fp32 layers stay fp32)
        graph_precision = onnx_precision(precision, major)
        # a LoRA combination refits by name from an earlier export of its checkpoint: no export of its own
        source = lora_refit_source(module, graph_precision, model_id) if refittable else None
        onnx = source[0] if source else None
        if onnx is None:
            onnx = cached_export(module, name=f"unet-{model_id[:12]}", precision=graph_precision, model_id=model_id)
    # strongly typed where the export has the engine's precision (cached_engine reads it from the export)
    build = BuildOptions(precision, refittable=refittable, workspace_gb=float(options["workspace_gb"]) or None)
    engine = cached_engine(onnx, [profile], build, device)
    graphs = str(options["cuda_graphs"])
    by_name = (source[1], model_id) if source else None
    key = (engine.manifest["key"], onnx.manifest["key"], model_id if by_name else "", device, prediction_type, graphs)
    return recent_engines().get(
        key,
        lambda: TensorRTDenoiser(
            engine,
            [profile],
            signature=signature,
            sample_channels=int(module.config.out_channels),
            prediction_type=prediction_type,
            device=device,
            onnx=onnx,
            dtype=dtype,
            cuda_graphs=graphs,
            residuals=taken,
            by_name=by_name,
        ),
    )


def lora_refit_source(module: Any, precision: str, model_id: str) -> tuple[Entry, dict[str, Any]] | None:
    """For a LoRA-fused U-Net: an export of its checkpoint to refit from by name, and its weights by that
    export's names (see :mod:`~difftool.runtimes.tensorrt.refit`)."""
    from difftool.exporters.onnx import export_components, lora_base
    from difftool.runtimes.tensorrt.refit import refit_source

    base = lora_base(module)
    if not base:
        return None
    found = refit_source(module, export_components(module, precision, model_id), base)
    if found is not None:
        log.info("refitting the %s engine by name for this LoRA combination (no export)", found[0].path.name)
    return found


def fp32_control_graph(precision: str, major: int) -> None:
    """Refuse a ControlNet run whose engines would need a non-fp32 graph (TensorRT 11 builds strongly typed
    networks only, and the ControlNet exports are fp32)."""
    if major >= 11 and precision != "fp32":
        raise ParameterError(
            f"ControlNet on this TensorRT needs an {precision} ONNX graph, and its exports are fp32",
            "run --control on TensorRT with --dtype fp32",
        )


def residual_unet_export(module: Any, model_id: str, shapes: Any, largest: int) -> tuple[Entry, Any, Profile]:
    """The residual-input U-Net's ONNX entry, its :class:`Residuals` and the engine profile for ``shapes``."""
    from difftool.exporters.onnx_controlnet import cached_residual_unet
    from difftool.runtimes.tensorrt.profiles import residual_profile

    entry, signature, residuals = cached_residual_unet(module, model_id)
    return entry, residuals, residual_profile(signature, residuals, *control_ranges(shapes, largest))


class TensorRTDenoiser(Denoiser):
    """Runs an engine on CUDA tensors in place: inputs and output stay on the GPU, no host copies."""

    backend = "tensorrt"

    def __init__(
        self,
        entry: Entry,
        profiles: Sequence[Profile],
        *,
        signature: Any,
        sample_channels: int,
        prediction_type: str,
        device: str,
        onnx: Entry | None = None,
        dtype: Any = None,
        cuda_graphs: str = "auto",
        residuals: Any = None,
        by_name: tuple[Mapping[str, Any], str] | None = None,
    ) -> None:
        """``residuals``: the :class:`~difftool.exporters.onnx_controlnet.Residuals` the engine takes as inputs;
        ``by_name``: weights by initializer name and their id, refitted in place of ``onnx``'s."""
        import tensorrt as trt
        import torch

        cuda = runtime()
        self.cuda_device = device
        self.device = cuda.placement(device)
        self.dtype = dtype or torch.float32  # the engine's precision; its inputs and output are fp32
        self.signature = signature
        self.in_channels, self.sample_channels = signature.in_channels, sample_channels
        self.prediction_type = prediction_type
        self.profiles = list(profiles)
        self.residuals = residuals
        self.fingerprint = entry.manifest["key"]
        self.engine_path = entry.file(ENGINE_FILE)
        with cuda.current(device):  # the engine, its context and stream belong to this GPU, not GPU 0
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            self.engine = self.runtime.deserialize_cuda_engine(entry.file(ENGINE_FILE).read_bytes())
            if self.engine is None:
                raise BackendUnavailableError(
                    f"TensorRT could not load the engine {entry.path.name} on {device} (out of GPU memory, "
                    "or built by another TensorRT or GPU)",
                    "free GPU memory, or clear the engine with `difftool cache clear` to rebuild it",
                )
            if by_name is not None and onnx is not None:
                from difftool.runtimes.tensorrt.refit import refit_by_name

                refit_by_name(self.engine, by_name[0], onnx, entry.path.name)
                self.fingerprint = f"{entry.manifest['key']}+{by_name[1][:16]}"
            elif load_weights(self.engine, entry, onnx):
                self.fingerprint = f"{entry.manifest['key']}+{onnx.manifest['key']}"  # type: ignore[union-attr]
            self.io = EngineIO.of(self.engine, entry.path.name)
            names = signature.input_names() + (list(residuals.names) if residuals is not None else [])
            self.io.expect(names)
            self.context = self.engine.create_execution_context()
            if self.context is None:
                raise BackendUnavailableError(
                    f"TensorRT could not create an execution context on {device} (out of GPU memory)",
                    "free GPU memory or lower --backend-opt max_size",
                )
            self.stream = cuda.new_stream(device)
        self._profile: int | None = None
        self.use_graphs = is_static(self.profiles) if cuda_graphs == "auto" else cuda_graphs == "on"
        self._graphs: dict[tuple[Any, ...], tuple[Any, dict[str, Any], Any]] = {}

    def _bind(self, inputs: Mapping[str, Any], out: Any) -> dict[str, Any]:
        """Bind ``inputs`` and ``out``; returns the tensors bound (copies, where misaligned: keep them)."""
        index = select_profile(self.profiles, {k: tuple(v.shape) for k, v in inputs.items()})
        if index != self._profile:
            _check(self.context.set_optimization_profile_async(index, self.stream.cuda_stream), f"profile {index}")
            self._profile = index
        bound = bind_inputs(self.context, self.io, inputs)
        bind_outputs(self.context, self.io, {self.io.output: out})
        return bound

    def _output(self, shape: tuple[int, ...]) -> Any:
        return aligned_empty(shape, self.io.dtype(self.io.output), self.device)

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise BackendUnavailableError("TensorRT failed to run the engine")

    def _replay(self, inputs: Mapping[str, Any], out_shape: tuple[int, ...]) -> Any:

        cuda = runtime()
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in inputs.items())
        if key not in self._graphs:
            # One graph at a time: a graph fixes the context's shapes and addresses, so a new shape
            # (an edge tile) is captured afresh rather than replayed over another shape's bindings.
            self._graphs.clear()
            static = {name: aligned(t.clone()) for name, t in inputs.items()}
            out = self._output(out_shape)
            static = self._bind(static, out)  # the graph reads what was bound (a cast or aligned copy)
            self._execute()  # TensorRT allocates shape-dependent resources on the first run, not capturable
            self.stream.synchronize()
            graph = cuda.new_graph()
            failed: Exception | None = None
            try:
                with cuda.capture(graph, self.stream):
                    try:
                        self._execute()
                    except Exception as error:  # noqa: BLE001 - the capture's exit would mask it
                        failed = error
            except Exception as error:  # noqa: BLE001 - the capture itself failed (e.g. an uncapturable kernel)
                failed = failed or error
            if failed is not None:
                log.warning("CUDA graph capture failed (%s); running TensorRT directly from now on", failed)
                self.use_graphs = False
                bound = self._bind(inputs, out)  # noqa: F841 - referenced until the launch has run
                self._execute()
                return out  # a fresh buffer, read after the caller's wait on this stream (no clone)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for name, tensor in static.items():
            tensor.copy_(inputs[name])
        graph.replay()
        return out.clone()

    def __call__(self, sample: Any, timestep: Any, cond: Mapping[str, Any]) -> Any:
        inputs = graph_inputs(self.signature, sample, timestep, cond, self.device)
        x = inputs["sample"]
        if self.residuals is not None:
            from difftool.exporters.onnx_controlnet import residual_inputs

            inputs |= residual_inputs(self.residuals, cond, x, self.device)
        return self.run(inputs, (x.shape[0], self.sample_channels, *x.shape[2:])).to(sample.dtype)

    def run(self, inputs: Mapping[str, Any], out_shape: tuple[int, ...]) -> Any:
        """The engine's output (of ``out_shape``) for ``inputs`` by name, ordered after PyTorch's current
        stream both ways; a subclass for another network's inputs builds them and calls this."""
        cuda = runtime()
        current = cuda.current_stream(self.cuda_device)
        self.stream.wait_stream(current)
        with cuda.current(self.cuda_device), cuda.use_stream(self.stream):
            if self.use_graphs:
                out = self._replay(inputs, out_shape)
            else:
                out = self._output(out_shape)
                bound = self._bind(inputs, out)  # noqa: F841 - referenced until the launch has run
                self._execute()
        current.wait_stream(self.stream)
        return out
