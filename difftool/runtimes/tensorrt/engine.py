"""TensorRT engines from the ONNX exports: build options, the build itself, refit, and the engine cache.

Written against TensorRT 10's and 11's Python APIs. An engine is built strongly typed from the ONNX
export of its own precision (fp16 from the fp16 export, which pins the timestep embedding and the
normalisations to fp32): TensorRT 11 builds nothing else (its ``BuilderFlag.FP16``/``BF16`` are gone),
and on TensorRT 10 a weakly typed ``FP16`` build has no precision constraints, so it may run those fp32
layers in fp16 (weak typing is deprecated from 10.12). Only what has no export of its precision (bf16;
fp16 from the fp32 ControlNet and upscaler exports) is built weakly typed, on TensorRT 10 only.
Every GPU question goes through :func:`difftool.core.cuda.runtime` and every build and load happens
with the requested device current, so ``--device cuda:1`` builds for, keys by and runs on GPU 1.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from difftool.core.cuda import runtime
from difftool.core.errors import BackendUnavailableError, ParameterError
from difftool.exporters.cache import ArtifactCache, Entry
from difftool.runtimes.tensorrt.profiles import Profile
from difftool.runtimes.tensorrt.progress import BuildProgress, progress_monitor

ENGINE_FILE = "model.engine"
log = logging.getLogger("difftool")


def unavailable_reason(device: str) -> str | None:
    """Why TensorRT cannot run on ``device`` here, or ``None``."""
    import importlib.util

    from difftool.core.cuda import device_index

    if not device.startswith("cuda"):
        return "TensorRT needs an NVIDIA GPU; pass --device cuda"
    cuda = runtime()
    if not cuda.is_available():
        return "TensorRT requires an NVIDIA GPU with CUDA support, and this PyTorch sees none"
    if device_index(device) >= cuda.device_count():
        return f"there is no GPU {device_index(device)} (found {cuda.device_count()}); use --device cuda:0"
    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed; pip install 'difftool[gpu]'"
    return None


def major_version(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


#: Engine precisions and the compute capability each needs (bf16: Ampere; fp8 needs a Q/DQ-quantized
#: ONNX export, which difftool does not make, so it is refused up front).
PRECISIONS = {"fp32": (0, 0), "fp16": (5, 3), "bf16": (8, 0)}
GIB = 1 << 30


@dataclass(frozen=True)
class BuildOptions:
    """How an engine is built: precision, refittable weights, and the builder's memory budget."""

    precision: str = "fp16"
    #: Refittable engines are keyed by the graph's structure, not its weights: a LoRA set or another
    #: fine-tune of the same architecture refits the engine in seconds instead of a rebuild.
    #: The others keep their build weights: built ``REFIT_IDENTICAL`` + ``STRIP_PLAN`` (see
    #: :func:`weight_flags`).
    refittable: bool = False
    #: Builder workspace in GiB (``None`` or 0: :func:`workspace_limit` decides).
    workspace_gb: float | None = None
    #: The precision of the ONNX export the engine is built from (see :func:`strongly_typed`).
    graph: str = "fp32"


def strongly_typed(options: BuildOptions, major: int) -> bool:
    """Whether the engine is built as a strongly typed network: the graph's own types, layer by layer.

    Always on TensorRT 11 (the only kind it builds), and whenever the export has the engine's precision:
    a weakly typed TensorRT 10 build with ``FP16`` and no precision constraints may run any layer in
    fp16, the fp32 timestep embedding and normalisations of the fp16 export included.
    """
    return major >= 11 or options.graph == options.precision


#: TensorRT 11.3 documents that ``BuilderFlag.REFIT`` may give wrong output even with no refit (a GEMM
#: bias can be dropped and is not exposed to the refit API); ``REFIT_IDENTICAL`` does not have it.
REFIT_WRONG_OUTPUT = (11, 3)


def version_tuple(trt: Any) -> tuple[int, int]:
    """TensorRT's (major, minor) version."""
    parts = str(trt.__version__).split(".")
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def weight_flags(options: BuildOptions) -> list[str]:
    """The ``trt.BuilderFlag`` names for an engine's weights.

    Refittable: ``REFIT`` (other weights of the same graph later). Otherwise the engine keeps its
    build weights: ``REFIT_IDENTICAL`` (no ``REFIT`` numerics issue, full speed) with ``STRIP_PLAN``,
    so the plan holds no copy of the weights the cached ONNX export already has (an SDXL engine is
    gigabytes less) and :func:`load_weights` refits them from that export at load.
    """
    return ["REFIT"] if options.refittable else ["REFIT_IDENTICAL", "STRIP_PLAN"]


def default_refittable(option: str, stable_diffusion: bool, version: tuple[int, int]) -> bool:
    """``--backend-opt refit``: ``on``/``off``, or ``auto``: Stable Diffusion U-Nets (LoRAs and
    fine-tunes refit), except on TensorRT 11.3+ where refittable engines may compute wrong output."""
    if option == "on":
        if version >= REFIT_WRONG_OUTPUT:
            log.warning(
                "refit=on: TensorRT %d.%d's refittable engines may drop a GEMM bias (NVIDIA known issue); "
                "refit=auto builds one engine per weights instead",
                *version,
            )
        return True
    if option == "off":
        return False
    return stable_diffusion and version < REFIT_WRONG_OUTPUT


def precision_flags(precision: str, capability: tuple[int, int], major: int = 10, typed: bool = False) -> list[str]:
    """The ``trt.BuilderFlag`` names for ``precision`` on a GPU of ``capability``, or a clear error.

    A strongly typed network (``typed``, and always on TensorRT 11, ``major``) takes no precision flags:
    the result is empty and the precision comes from the ONNX export (:func:`onnx_precision`).
    """
    if precision == "fp8":
        raise ParameterError(
            "TensorRT fp8 needs a quantized (Q/DQ) ONNX export, which difftool does not make",
            "build in fp16 or bf16",
        )
    if precision not in PRECISIONS:
        raise ParameterError(f"unknown TensorRT precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    if capability < PRECISIONS[precision]:
        needed = ".".join(map(str, PRECISIONS[precision]))
        raise ParameterError(
            f"this GPU (compute capability {capability[0]}.{capability[1]}) has no {precision} TensorRT kernels "
            f"(needs {needed} or newer)",
            "build in fp16" if precision == "bf16" else "build in fp32",
        )
    if major >= 11:
        onnx_precision(precision, major)  # refuses what no export of difftool's can give
        return []
    return [] if typed or precision == "fp32" else [precision.upper()]


def onnx_precision(precision: str, major: int) -> str:
    """The ONNX export an engine of ``precision`` is built from under TensorRT ``major``: its own
    precision (strongly typed), except bf16 on TensorRT 10 (no bf16 export: the fp32 one, ``BF16`` flag)."""
    if precision != "bf16":
        return precision
    if major < 11:
        return "fp32"
    raise ParameterError(
        "TensorRT 11 builds the precision of the ONNX graph, and difftool exports fp32 and fp16 only",
        "run with --dtype fp16 (or fp32)",
    )


def workspace_limit(free: int, requested_gb: float | None = None) -> int:
    """The builder's workspace budget in bytes, given ``free`` GPU memory.

    By default 60% of the memory free when the build starts, so the weights TensorRT holds while
    timing tactics and the rest of the process still fit (an SDXL build on a 12 GB card stays inside
    it instead of failing with an out-of-memory error half-way); a request above what is free is an error.
    """
    if requested_gb:
        requested = int(requested_gb * GIB)
        if requested > free:
            raise ParameterError(
                f"workspace_gb={requested_gb:g} asks for more than the {free / GIB:.1f} GiB free on this GPU",
                "lower --backend-opt workspace_gb or free GPU memory",
            )
        return requested
    return max(256 << 20, int(free * 0.6))


def gpu_identity(device: str) -> str:
    """The GPU model and memory size: TensorRT rejects timing caches and engines from other GPUs."""
    cuda = runtime()
    return f"{cuda.name(device)} {cuda.total_memory(device) >> 20} MiB"


def timing_cache_path(root: Path, tensorrt_version: str, capability: tuple[int, int], gpu: str = "") -> Path:
    """One timing cache per TensorRT version and GPU (architecture, model and memory)."""
    tag = f"-{hashlib.sha256(gpu.encode()).hexdigest()[:8]}" if gpu else ""
    return root / "tensorrt" / f"timing-{tensorrt_version}-sm{capability[0]}{capability[1]}{tag}.cache"


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    profiles: Sequence[Profile],
    options: BuildOptions = BuildOptions(),
    timing_cache: Path | None = None,
    progress: BuildProgress | None = None,
    device: str = "cuda",
) -> None:
    """Parse ``onnx_path`` and build a serialized engine with ``profiles`` into ``engine_path`` on ``device``.

    ``timing_cache`` is read before and written (atomically) after the build: later builds of any
    model on this GPU skip the tactic timings it holds. A cache TensorRT rejects is replaced.
    """
    import tensorrt as trt

    from difftool.core.atomic import atomic_write_bytes

    cuda = runtime()
    major = major_version(trt)
    with cuda.current(device):
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        # TensorRT 10: explicit batch is the only mode; 11: strongly typed is the only mode
        typed = strongly_typed(options, major)
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            fix = "run this model with --backend onnx (ONNX Runtime) or torch; no engine was built"
            raise BackendUnavailableError(f"TensorRT cannot parse the ONNX export: {errors}", fix)
        config = builder.create_builder_config()
        for flag in precision_flags(options.precision, cuda.capability(device), major, typed):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in weight_flags(options):
            config.set_flag(getattr(trt.BuilderFlag, flag))
        free, _ = cuda.mem_get_info(device)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_limit(free, options.workspace_gb))
        cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
        timing = config.create_timing_cache(cache_bytes)  # None when the bytes are not a timing cache at all
        if timing is None or not config.set_timing_cache(timing, False):  # False: reject a foreign one
            log.warning(
                "TensorRT rejected the timing cache %s (another GPU or version); starting a new one", timing_cache
            )
            if not config.set_timing_cache(config.create_timing_cache(b""), False):
                raise BackendUnavailableError(
                    "TensorRT refused an empty timing cache", "report this with `difftool info`"
                )
        monitor = progress_monitor(trt, progress or BuildProgress())
        config.progress_monitor = monitor  # kept referenced until the build returns
        for profile in profiles:
            optimization = builder.create_optimization_profile()
            for name, (low, opt, high) in profile.shapes.items():
                optimization.set_shape(name, low, opt, high)
            if config.add_optimization_profile(optimization) < 0:  # -1: TensorRT found it invalid
                shapes = ", ".join(
                    f"{n} {list(lo)}/{list(op)}/{list(hi)}" for n, (lo, op, hi) in profile.shapes.items()
                )
                raise BackendUnavailableError(
                    f"TensorRT refused the optimization profile {shapes} (min/opt/max)",
                    "each input needs min <= opt <= max of one rank; report it with `difftool info`",
                )
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BackendUnavailableError(
            "TensorRT failed to build the engine (see its log above)",
            "if it ran out of memory, lower --backend-opt workspace_gb or max_size",
        )
    engine_path.write_bytes(bytes(serialized))
    if timing_cache is not None:
        merge_timing_cache(config, timing_cache, atomic_write_bytes)


def merge_timing_cache(config: Any, path: Path, write: Any) -> None:
    """Write the build's timing cache to ``path`` merged with what is there now, under a lock.

    Builds of other engines (other processes) may have written the file since this build read it:
    rewriting it with this build's cache alone would lose their timings, so the file is read again
    under an exclusive lock and this build's entries are combined into it (``ITimingCache.combine``).
    """
    from difftool.exporters.cache import _locked

    ours = config.get_timing_cache()
    with _locked(path.with_name(path.name + ".lock")):
        current = path.read_bytes() if path.is_file() else b""
        merged = config.create_timing_cache(current) if current else None
        if merged is not None and merged.combine(ours, False):
            ours = merged
        elif current:
            log.warning("replacing the timing cache %s TensorRT could not merge into", path.name)
        write(path, bytes(ours.serialize()))


def engine_components(
    onnx: Entry,
    structure: str,
    profiles: Sequence[Profile],
    options: BuildOptions,
    tensorrt_version: str,
    capability: tuple[int, int],
    gpu: str = "",
) -> dict[str, Any]:
    """The engine's cache-key components. Refittable engines depend on the graph's structure, others
    on the exact export (weights included).

    ``model`` (the export's weights id) tells models apart, so a new export of the same model (new
    versions: another ``onnx`` key) supersedes its engine and another model's engine never does; the
    GPU, precision and profiles are never superseded (see :meth:`ArtifactCache.get_or_build`).
    """
    exported = onnx.manifest.get("components", {})
    # a LoRA combination's engine replaces the previous combination's of that checkpoint, like its export
    model = exported.get("weights", onnx.manifest.get("name"))
    if exported.get("lora_of"):
        model = f"{exported['lora_of']}+lora"
    return {
        **({"structure": structure} if options.refittable else {"onnx": onnx.manifest["key"], "model": model}),
        "refittable": options.refittable,
        "profiles": [p.as_json() for p in profiles],
        "precision": options.precision,
        "tensorrt": tensorrt_version,
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "gpu": gpu,
        # 2: precision names, refit, workspace and timing cache; 3: the GPU model; 4: the model's identity,
        # REFIT_IDENTICAL + STRIP_PLAN for engines keeping their build weights
        "format": 4,
    }


def cached_engine(
    onnx: Entry,
    profiles: Sequence[Profile],
    options: BuildOptions,
    device: str = "cuda",
    cache: ArtifactCache | None = None,
) -> Entry:
    """The engine for an ONNX cache entry on ``device``: keyed by the export (or, refittable, its structure),
    profiles, precision, TensorRT version and the GPU (compute capability, model and memory)."""
    import tensorrt as trt

    from difftool.exporters.onnx import structure_hash

    cache = cache or ArtifactCache()
    # the export's own precision, not the caller's word: it decides the typing (and is in the export's key)
    options = replace(options, graph=str(onnx.manifest.get("components", {}).get("precision", "fp32")))
    capability = runtime().capability(device)
    gpu = gpu_identity(device)
    structure = structure_hash(onnx.file("model.onnx"))
    components = engine_components(onnx, structure, profiles, options, trt.__version__, capability, gpu)

    def build(folder: Path) -> dict[str, Any]:
        started = time.perf_counter()
        timing = timing_cache_path(cache.root, trt.__version__, capability, gpu)
        build_engine(onnx.file("model.onnx"), folder / ENGINE_FILE, profiles, options, timing, device=device)
        return {
            "seconds": round(time.perf_counter() - started, 2),
            "weights": onnx.manifest["key"],
            "stripped": "STRIP_PLAN" in weight_flags(options),  # its weights come from that export at load
        }

    name = f"unet-{structure[:12]}" if options.refittable else onnx.manifest["name"]
    return cache.get_or_build("tensorrt", name, components, build)


def needs_refit(engine: Entry, onnx: Entry) -> bool:
    """Whether a refittable engine holds other weights than the ONNX export it is asked to run."""
    return (
        bool(engine.manifest["components"].get("refittable")) and engine.manifest.get("weights") != onnx.manifest["key"]
    )


def load_weights(engine: Any, entry: Entry, onnx: Entry | None) -> bool:
    """Give the deserialized ``engine`` its weights: a stripped plan's from its own export, a refittable
    one's from ``onnx`` when it holds others. Returns whether the engine now runs other weights than
    it was built with (the run's fingerprint then names both)."""
    if entry.manifest.get("stripped"):
        if onnx is None or onnx.manifest["key"] != entry.manifest.get("weights"):
            raise BackendUnavailableError(
                f"TensorRT engine {entry.path.name} holds no weights and its ONNX export is not at hand",
                "clear the engine with `difftool cache clear` to rebuild it",
            )
        refit(engine, onnx.file("model.onnx"))
        return False
    if onnx is not None and needs_refit(entry, onnx):
        log.warning("refitting TensorRT engine %s with new weights", entry.path.name)
        refit(engine, onnx.file("model.onnx"))
        return True
    return False


def refit(engine: Any, onnx_path: Path) -> None:
    """Load the weights of ``onnx_path`` (same structure) into the deserialized ``engine``, in memory."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    refitter = trt.Refitter(engine, logger)
    parser = trt.OnnxParserRefitter(refitter, logger)
    if not parser.refit_from_file(str(onnx_path)) or not refitter.refit_cuda_engine():
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailableError(
            f"TensorRT could not refit the engine with {onnx_path.parent.name}: {errors or 'see its log above'}",
            "clear the engine (difftool cache clear) to rebuild it",
        )


def load_engine(entry: Entry, device: str, onnx: Entry | None = None) -> tuple[Any, Any, Any, Any]:
    """``entry``'s engine on ``device``: its runtime, engine, execution context and stream (all of that GPU).

    ``onnx``: the export it was built from, whose weights a stripped engine takes at load.
    """
    import tensorrt as trt

    cuda = runtime()
    with cuda.current(device):
        trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = trt_runtime.deserialize_cuda_engine(entry.file(ENGINE_FILE).read_bytes())
        if engine is not None:
            load_weights(engine, entry, onnx)
        context = engine.create_execution_context() if engine is not None else None
        if context is None:
            raise BackendUnavailableError(
                f"TensorRT could not load the engine {entry.path.name} on {device} (out of GPU memory, or "
                "built by another TensorRT or GPU)",
                "free GPU memory, or clear the engine with `difftool cache clear` to rebuild it",
            )
        return trt_runtime, engine, context, cuda.new_stream(device)
