"""The build side of the ``tensorrt`` stand-in: networks, builder configs, profiles, timing caches, the
builder and the ONNX parser (see :mod:`difftool.testing.fake_tensorrt` for what each refuses and why)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, ClassVar

from difftool.testing.fake_tensorrt_engine import _dims, _engine_model, _graph_inputs, _weights

if TYPE_CHECKING:
    from difftool.testing.fake_tensorrt_state import FakeTensorRTState

_MAGIC = b"FAKETRT1"
_TIMING_MAGIC = b"FAKETC1:"
#: The ONNX opsets TensorRT 10's parser reads (onnx-tensorrt docs/operators.md: 9 up to 20-22 by release).
OPSETS = (9, 22)
#: Default-domain operators onnx-tensorrt has no importer for (its operators.md, "N" in every 8.x-10.x
#: release): a graph holding one fails to parse on a real GPU, so it fails here.
UNSUPPORTED_OPS = frozenset(
    "BitShift ConcatFromSequence ConvInteger Det MatMulInteger MaxUnpool NegativeLogLikelihoodLoss "
    "SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength "
    "SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer TfIdfVectorizer Unique".split()
)


class _Errors:
    """TensorRT parsers' error list: ``num_errors`` and ``get_error(i)``."""

    errors: list[str]

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, index: int) -> str:
        return self.errors[index]


class Network:
    def __init__(self, flags: int) -> None:
        self.flags = flags
        self.model: Any = None


class TimingCache:
    """Tactic timings: one entry per (layer kind, profile) a build timed, tagged with the version."""

    def __init__(self, version: str, entries: set[str] | None = None) -> None:
        self.version, self.entries = version, set(entries or ())

    def serialize(self) -> bytes:
        body = {"version": self.version, "entries": sorted(self.entries)}
        return _TIMING_MAGIC + json.dumps(body).encode()

    def combine(self, other: TimingCache, ignore_mismatch: bool) -> bool:
        self.entries |= other.entries
        return True

    def reset(self) -> bool:
        self.entries.clear()
        return True


def parse_timing(data: bytes, version: str) -> TimingCache | None:
    if not data:
        return TimingCache(version)
    if not data.startswith(_TIMING_MAGIC):
        return None  # not a timing cache at all
    body = json.loads(data[len(_TIMING_MAGIC) :])
    if body["version"] != version:
        return None  # TensorRT reads only its own version's caches
    return TimingCache(version, set(body["entries"]))


class Config:
    def __init__(self, state: FakeTensorRTState) -> None:
        self.state = state
        self.flags: list[str] = []
        self.pools: dict[str, int] = {}
        self.timing: TimingCache | None = None
        self.profiles: list[dict[str, Any]] = []
        self.progress_monitor: Any = None

    def set_flag(self, flag: str) -> None:
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def create_timing_cache(self, data: bytes) -> TimingCache | None:
        return parse_timing(bytes(data), self.state.version)

    def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
        if "timing_cache" in self.state.fail and cache.entries:
            return False
        self.timing = cache
        return True

    def get_timing_cache(self) -> TimingCache:
        return self.timing or TimingCache(self.state.version)

    def add_optimization_profile(self, profile: Any) -> int:
        for low, opt, high in profile.shapes.values():
            if not len(low) == len(opt) == len(high) or any(
                not 0 <= a <= b <= c for a, b, c in zip(low, opt, high, strict=True)
            ):
                return -1  # IOptimizationProfile::isValid() is false: TensorRT refuses it
        self.profiles.append(dict(profile.shapes))
        return len(self.profiles) - 1


class OptimizationProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, low: Any, opt: Any, high: Any) -> None:
        self.shapes[name] = [list(low), list(opt), list(high)]


class Builder:
    #: The fake's state: :func:`~difftool.testing.fake_tensorrt.fake_tensorrt` binds it in a subclass.
    state: ClassVar[FakeTensorRTState]

    def __init__(self, logger: Any) -> None:
        self.state.created_on.append(("builder", self.state.cuda.current_index))

    def create_network(self, flags: int = 0) -> Network:
        if self.state.release >= (11, 0) and not flags & (1 << 5):
            raise RuntimeError("TensorRT 11 builds strongly typed networks only")
        return Network(flags)

    def create_builder_config(self) -> Config:
        return Config(self.state)

    def create_optimization_profile(self) -> OptimizationProfile:
        return OptimizationProfile()

    def build_serialized_network(self, network: Network, config: Config) -> bytes | None:
        if network.model is None or not config.profiles:
            return None
        typed = bool(network.flags & (1 << 5))
        if typed and {"FP16", "BF16"} & set(config.flags):
            return None  # strongly typed networks take no precision flags
        if not typed and {"FP16", "BF16"} & set(config.flags) and self.state.release >= (10, 12):
            self.state.warnings.append("weakly typed networks (BuilderFlag.FP16/BF16) are deprecated")
        if "WORKSPACE" not in config.pools:
            return None
        inputs = {value.name: _dims(value) for value in _graph_inputs(network.model)}
        for profile in config.profiles:
            if set(profile) - set(inputs):
                return None  # a profile for a tensor that is not a network input
            if any(-1 in dims and name not in profile for name, dims in inputs.items()):
                return None  # "Optimization profile is missing values for" a dynamic input
        while self.state.during_build:
            self.state.during_build.pop(0)()
        self.state.builds += 1
        self.state.build_flags.append(list(config.flags))
        self.state.build_typed.append(typed)
        self.state.build_profiles.append([dict(p) for p in config.profiles])
        refit = "REFIT" if "REFIT" in config.flags else "REFIT_IDENTICAL" if "REFIT_IDENTICAL" in config.flags else None
        header = {
            "profiles": config.profiles,
            "refit": refit,
            "stripped": refit is not None and "STRIP_PLAN" in config.flags,
            "drops_gemm_bias": refit == "REFIT" and self.state.release >= (11, 3),
            # no precision constraints: TensorRT may pick fp16 for any layer (the stand-in does)
            "weak_fp16": not typed and "FP16" in config.flags,
            "weights": _weights(network.model),
            "device": self.state.cuda.current_index,
            "capability": list(self.state.cuda.capability(f"cuda:{self.state.cuda.current_index}")),
        }
        timed = {f"{node.op_type}|{json.dumps(config.profiles)}" for node in network.model.graph.node}
        config.get_timing_cache().entries |= timed
        if config.progress_monitor is not None:
            config.progress_monitor.phase_start("Building engine", None, 1)
            config.progress_monitor.step_complete("Building engine", 0)
            config.progress_monitor.phase_finish("Building engine")
        model = _engine_model(network.model, strip=header["stripped"], drop_gemm_bias=header["drops_gemm_bias"])
        raw = json.dumps(header).encode()
        return _MAGIC + len(raw).to_bytes(8, "little") + raw + model.SerializeToString()


class OnnxParser(_Errors):
    def __init__(self, network: Network, logger: Any) -> None:
        self.network = network
        self.errors: list[str] = []

    def parse_from_file(self, path: str) -> bool:
        import onnx

        try:
            onnx.checker.check_model(path)  # by path: a model with > 2 GB of external data checks too
            model = onnx.load(path)
        except Exception as error:  # noqa: BLE001 - reported like TensorRT's parser errors
            self.errors.append(str(error))
            return False
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if not OPSETS[0] <= opset <= OPSETS[1]:
            self.errors.append(f"unsupported ONNX opset {opset}: this parser reads opsets {OPSETS[0]} to {OPSETS[1]}")
            return False
        for node in model.graph.node:
            # onnx-tensorrt imports the default domain only (an ONNX Runtime contrib op is not a TensorRT layer)
            if node.domain not in ("", "ai.onnx") or node.op_type in UNSUPPORTED_OPS:
                self.errors.append(
                    f"No importer registered for op: {node.op_type} ({node.domain or 'ai.onnx'}). "
                    "Attempting to import as plugin. Plugin not found"
                )
                return False
        self.network.model = model
        return True
