"""A small builder over `onnx.helper` for the graphs edgemoe writes.

Weights go to one external-data file per graph, each tensor at a 4 KiB-aligned offset so that
onnxruntime can map them from storage instead of copying them. Node names are hierarchical
(`/layers.3/attn/q_proj/MatMul`) so profiles and errors point at the model part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Opset 18 and IR version 8 load on every onnxruntime edgemoe supports (1.22 and newer).
OPSET = 18
IR_VERSION = 8
ALIGNMENT = 4096
# Packed integer weights are copied into prepacked buffers when the session is created, never
# mapped, so they only need cache-line alignment. Page alignment would pad every scale and
# zero-point array to 4 KiB: a third of a small 2-bit expert's file.
RAW_ALIGNMENT = 64

_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.uint8): TensorProto.UINT8}
# Operators outside the default domain that expert graphs may use (MatMulNBits).
MS_DOMAIN = "com.microsoft"


class GraphBuilder:
    """Collects nodes and initializers, then writes `NAME.onnx` with weights in a `.bin` file."""

    def __init__(self, name: str, weight_dtype: np.dtype = np.dtype(np.float32)):
        self.name = name
        self.weight_dtype = np.dtype(weight_dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._weights: list[tuple[str, np.ndarray, int]] = []  # name, array, alignment
        self._shared: list[tuple[str, np.ndarray, str, int]] = []  # weights stored in another graph's file
        self._constants: list[onnx.TensorProto] = []
        self._count = 0
        self.domains: set[str] = set()  # non-default operator domains used, each at version 1
        self.metadata: dict[str, str] = {}  # model metadata_props, readable from an onnxruntime session

    # Graph interface

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, elem_type: int, shape: list) -> None:
        self.op("Identity", [value], scope=name, outputs=[name])
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def op(self, op_type: str, inputs: list[str], scope: str, outputs: list[str] | None = None,
           num_outputs: int = 1, **attrs) -> str | list[str]:
        """Add one node named `scope/op_type` and return its output name(s)."""
        self._count += 1
        node_name = f"{scope}/{op_type}_{self._count}"
        if outputs is None:
            outputs = [f"{node_name}/out{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def weight(self, name: str, array: np.ndarray, widen: bool = True) -> str:
        """Add a weight stored in this graph's external-data file, in the builder's dtype.

        With fp16 weights and `widen`, the returned value is float32: a Cast follows the
        initializer (onnxruntime folds it into a float32 copy when the session is created).
        """
        stored = np.ascontiguousarray(array, dtype=self.weight_dtype)
        self._weights.append((name, stored, ALIGNMENT))
        if self.weight_dtype == np.float32 or not widen:
            return name
        return self.op("Cast", [name], scope=name, to=TensorProto.FLOAT)

    def raw_weight(self, name: str, array: np.ndarray) -> str:
        """Add a weight stored in its own dtype (packed integers, their float32 scales)."""
        self._weights.append((name, np.ascontiguousarray(array), RAW_ALIGNMENT))
        return name

    def shared_weight(self, name: str, array: np.ndarray, location: str, offset: int) -> str:
        """Reference a weight already written to another graph's data file (tied embeddings).

        `location` is relative to the directory this graph is saved in.
        """
        stored = np.ascontiguousarray(array, dtype=self.weight_dtype)
        self._shared.append((name, stored, location, offset))
        if self.weight_dtype == np.float32:
            return name
        return self.op("Cast", [name], scope=name, to=TensorProto.FLOAT)

    def const(self, name: str, array: np.ndarray) -> str:
        """Add a small constant stored inside the graph (shapes, axes, scalars)."""
        self._constants.append(numpy_helper.from_array(np.asarray(array), name=name))
        return name

    # Writing

    def save(self, directory: Path, stem: str, data_stem: str | None = None) -> tuple[Path, Path, dict[str, int]]:
        """Write `stem.onnx` and `stem.bin` under `directory`.

        With `data_stem`, only the graph is written, and its weights point into the existing
        `data_stem.bin`: the one a graph with the same weights in the same order wrote.

        Returns:
            The graph path, the data path, and each weight's offset in the data file.
        """
        onnx_path = directory / f"{stem}.onnx"
        data_path = directory / f"{data_stem or stem}.bin"
        initializers, offsets, position = [], {}, 0
        with open(data_path, "rb" if data_stem else "wb") as data:
            for name, array, alignment in self._weights:
                pad = (-position) % alignment
                if not data_stem:
                    data.write(b"\0" * pad)
                offsets[name] = position + pad
                position = offsets[name] + array.nbytes
                if not data_stem:
                    data.write(array.tobytes())
                initializers.append(_external_tensor(name, array, data_path.name, offsets[name]))
        if data_stem and position != data_path.stat().st_size:
            raise ValueError(f"the weights of {stem} do not match the layout of {data_path}")
        for name, array, location, offset in self._shared:
            initializers.append(_external_tensor(name, array, location, offset))
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=initializers + self._constants)
        opsets = [helper.make_opsetid("", OPSET)] + [helper.make_opsetid(d, 1) for d in sorted(self.domains)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="edgemoe")
        model.ir_version = IR_VERSION
        helper.set_model_props(model, self.metadata)
        onnx.save_model(model, str(onnx_path))
        return onnx_path, data_path, offsets


def _external_tensor(name: str, array: np.ndarray, location: str, offset: int) -> onnx.TensorProto:
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = _ONNX_TYPES[array.dtype]
    tensor.dims.extend(array.shape)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor
