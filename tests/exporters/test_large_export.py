"""Issue 30, part A: an export over protobuf's 2 GB limit (external data) goes through difftool's export
steps, as the SDXL U-Net's 10 GB fp32 export must. Built cheaply: one zero tensor in a sparse data file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

#: 2.15 GB of fp32 zeros: past protobuf's 2 GB limit.
COUNT = 2**29 + 2**20


def _big_export(folder: Path) -> Path:
    """``out = x + sum(big)``, ``big`` in ``model.onnx.data``: written sparse (no 2 GB of disk or memory)."""
    import onnx
    from onnx import TensorProto, helper

    big = onnx.TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[COUNT])
    big.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "model.onnx.data"), ("offset", "0"), ("length", str(COUNT * 4))):
        big.external_data.add(key=key, value=value)
    with open(folder / "model.onnx.data", "wb") as data:
        data.truncate(COUNT * 4)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
            helper.make_node("Add", ["x", "total"], ["out"]),
        ],
        "unet",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n"])],
        [big],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


@pytest.mark.slow  # reads and converts 2.15 GB: ~1 min and ~10 GB of memory (fp16 conversion copies)
def test_an_export_past_2_gb_is_hashed_converted_and_parsed_by_path(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    from difftool.exporters.onnx import structure_hash
    from difftool.exporters.onnx_fp16 import to_fp16
    from difftool.testing.gpu import gpu_harness

    path = _big_export(tmp_path)
    before = structure_hash(path)  # reads the graph, not the weights
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)
    del session
    with gpu_harness():
        import tensorrt as trt

        parser = trt.OnnxParser(trt.Builder(trt.Logger()).create_network(0), trt.Logger())
        assert parser.parse_from_file(str(path)), [parser.get_error(i) for i in range(parser.num_errors)]
    to_fp16(path, external=True)  # loaded whole (2.15 GB), converted, saved with external data again
    converted = onnx.load(str(path), load_external_data=False)
    big = next(init for init in converted.graph.initializer if init.name == "big")
    assert big.data_type == onnx.TensorProto.FLOAT16 and big.data_location == onnx.TensorProto.EXTERNAL
    assert (tmp_path / "model.onnx.data").stat().st_size == COUNT * 2
    assert structure_hash(path) != before  # fp16 weights: another engine
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], x)  # fp32 I/O kept
