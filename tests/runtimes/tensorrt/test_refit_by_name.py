"""Issue 30, item 4: a LoRA combination refits the engine by name from PyTorch's weights, with no export
of its own; and the stand-in's refitter refuses what TensorRT's does (types, counts, missing weights)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from difftool.app import api
from difftool.testing.gpu import gpu_harness
from difftool.training.evaluate import psnr

pytest.importorskip("onnxruntime")


def _score(a: api.RunResult, b: api.RunResult) -> float:
    return psnr(np.asarray(a.image, np.float32) / 255, np.asarray(b.image, np.float32) / 255)


def _exports(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "onnx").iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.slow  # one tiny SD U-Net export and engine, three runs on the stand-in
def test_lora_combinations_refit_by_name_with_no_export_of_their_own(tmp_path: Path, cache: Path) -> None:
    pytest.importorskip("peft")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins" / "builtin"))
    from sd import tiny
    from sd.test_lora import make_lora

    parts = tiny.components(seed=5)
    folder = tiny.save_folder(parts, tmp_path / "sd")
    lora = make_lora(parts["unet"], tmp_path / "lora" / "style.safetensors")
    common = {"model": str(folder), "prompt": "a kite", "width": 32, "height": 32, "steps": 2, "seed": 6}
    with gpu_harness() as harness:
        api.run("generate", backend="tensorrt", device="cuda", dtype="fp32", **common)
        exports = _exports(cache)
        full = api.run("generate", backend="tensorrt", device="cuda", dtype="fp32", lora=f"{lora}:1", **common)
        more = api.run("generate", backend="tensorrt", device="cuda", dtype="fp32", lora=f"{lora}:4", **common)
    assert _exports(cache) == exports and len(exports) == 1  # the checkpoint's export only
    refit_map = json.loads(next((cache / "onnx").glob("*/refit-map.json")).read_text())
    assert refit_map["complete"] and any(w["transposed"] for w in refit_map["weights"].values())
    assert harness.trt.builds == 1 and harness.trt.refits == 2  # one engine, refitted per combination
    scores = []
    for result, weight in ((full, "1"), (more, "4")):
        reference = api.run("generate", backend="torch", dtype="fp32", lora=f"{lora}:{weight}", **common)
        scores.append(_score(reference, result))
        assert scores[-1] > 40  # the LoRA's weights reached the engine
    assert _score(full, more) < min(scores)  # each combination's own weights, not the previous one's
    assert full.record["artifact"] != more.record["artifact"]


def _engine(weights: dict[str, np.ndarray], *, refit: str = "REFIT", strip: bool = False) -> Any:
    """A deserialized stand-in engine of a Conv (weight + bias) followed by a Mul by a constant."""
    from onnx import TensorProto, helper, numpy_helper

    from difftool.testing.fake_tensorrt_engine import Engine

    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["y"]),
            helper.make_node("Mul", ["y", "k"], ["out"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 2, 4, 4])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    header = {"refit": refit, "stripped": strip, "drops_gemm_bias": False, "weights": "", "profiles": [{}]}
    state = type("State", (), {"refits": 0})()
    return Engine(state, header, model.SerializeToString())  # type: ignore[arg-type]


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((2, 2, 1, 1)).astype(np.float32),
        "b": rng.standard_normal(2).astype(np.float32),
        "k": np.full((1,), 2.0, np.float16).astype(np.float32),
    }


def test_the_stand_in_refitter_refuses_other_types_counts_and_names() -> None:
    from difftool.testing.fake_tensorrt import Refitter, Weights

    refitter = Refitter(_engine(_weights()), None)
    half = torch.zeros(4, dtype=torch.float16)
    single = torch.zeros(4, dtype=torch.float32)
    assert refitter.get_weights_prototype("w").dtype == "FLOAT" and refitter.get_weights_prototype("w").count == 4
    assert refitter.get_weights_prototype("nope").count == -1
    assert not refitter.set_named_weights("w", Weights("HALF", half.data_ptr(), 4))  # not the prototype's type
    assert not refitter.set_named_weights("w", Weights("FLOAT", single.data_ptr(), 3))  # not its count
    assert not refitter.set_named_weights("nope", Weights("FLOAT", single.data_ptr(), 4))
    assert refitter.set_named_weights("w", Weights("FLOAT", single.data_ptr(), 4))
    assert refitter.get_missing_weights() == ["b"]  # the Conv's bias goes with its weight
    assert not refitter.refit_cuda_engine()


def test_refit_by_name_casts_to_the_prototype_and_fills_missing_weights_from_the_export(tmp_path: Path) -> None:
    """The module holds ``w`` (in bf16, say) but not ``b``, a constant of the export: the cast follows the
    engine's prototype, and the weight TensorRT misses comes from the export."""
    from onnx import numpy_helper

    from difftool.exporters.cache import Entry
    from difftool.runtimes.tensorrt.refit import refit_by_name

    weights = _weights()
    engine = _engine(weights)
    export = _engine(weights).model
    new_b = np.arange(2, dtype=np.float32)
    for index, init in enumerate(export.graph.initializer):
        if init.name == "b":
            export.graph.initializer[index].CopyFrom(numpy_helper.from_array(new_b, "b"))
    (tmp_path / "model.onnx").write_bytes(export.SerializeToString())
    source = Entry(tmp_path, {"files": {"model.onnx": ""}})
    new_w = torch.randn(2, 2, 1, 1).to(torch.bfloat16)
    with gpu_harness():
        refit_by_name(engine, {"w": new_w}, source, "toy")
    assert engine.refitted
    got = {i.name: numpy_helper.to_array(i) for i in engine.model.graph.initializer}
    np.testing.assert_array_equal(got["w"], new_w.float().numpy())
    np.testing.assert_array_equal(got["b"], new_b)
