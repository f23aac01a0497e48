"""Parse the builder's verbose layer table into records.

With `ProfilingVerbosity.DETAILED`, the build log holds one message starting `Layers:` with one
line per engine layer:
    Name: ..., LayerType: correlation|gemm|kgen|..., Inputs: [ { Name: ..., Dimensions: [...],
    ..., Datatype: Int8, ... } ], Constants: [ ... ], Outputs: [ ... ], TacticName: ...,
    StreamId: 0, Metadata: [ONNX Layer: conv_node][ONNX Layer: dq_node]
A Conv runs as `correlation`, a MatMul/Gemm as `gemm`; standalone `kgen` layers named like
`MulMinMaxRounCast` are quantize kernels that no compute layer absorbed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SECTION = re.compile(r"(Inputs|Constants|Outputs): \[(.*?)\](?=, (?:Constants|Outputs|TacticName|StreamId|Metadata): |$)")
_DATATYPE = re.compile(r"Datatype: (\w+)")
_DIMENSIONS = re.compile(r"Dimensions: \[([-\d,]*)\]")
_ONNX_PREFIX = "[ONNX Layer: "
# Layer types that run a Conv/ConvTranspose/MatMul/Gemm. `runtime_fusion` is a Myelin kernel that
# fuses a matrix multiply with its neighbours (seen for MatMuls whose weight was dequantized apart).
COMPUTE_LAYER_TYPES = ("correlation", "convolution", "deconv", "deconvolution", "gemm", "matmul", "runtime_fusion")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class EngineLayer:
    """One engine layer: its kind, the data types it reads, and the ONNX nodes fused into it."""

    name: str
    layer_type: str
    inputs: tuple[TensorInfo, ...]
    constants: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    onnx_nodes: tuple[str, ...]

    @property
    def input_dtypes(self) -> tuple[str, ...]:
        return tuple(t.dtype for t in self.inputs)

    @property
    def weight_dtype(self) -> str:
        """The data type of the layer's weight: its largest constant that is a matrix or kernel
        (scales and bias vectors are not), '' when the weight arrives as an input instead (MatMul
        of two activations, or a weight an earlier layer dequantized)."""
        weights = [t for t in self.constants if len(self.inputs) == 1 or sum(1 for d in t.dims if d > 1) >= 2]
        return max(weights, key=lambda t: _volume(t.dims)).dtype if weights else ""

    @property
    def is_compute(self) -> bool:
        """A convolution / matrix-multiply kernel (the layers INT8 coverage is about)."""
        return self.layer_type in COMPUTE_LAYER_TYPES or self.is_attention

    @property
    def is_attention(self) -> bool:
        """A fused attention kernel (Q.K^T, softmax and P.V in one `kgen` layer named `_gemm_mha_...`)."""
        return "_mha" in self.name

    @property
    def runs_int8(self) -> bool:
        """The multiply reads Int8 on both sides: data input and weight constant, or, without a
        weight constant, its first two inputs. (A residual fused as a further input may be float.)"""
        if self.is_attention:  # Q, K and V in Int8; the additive mask may stay float
            int8_inputs = sum(1 for t in self.inputs if t.dtype == "Int8")
            return int8_inputs >= 3 and len(self.inputs) - int8_inputs <= 1
        if self.weight_dtype:
            return bool(self.inputs) and self.inputs[0].dtype == "Int8" and self.weight_dtype == "Int8"
        return len(self.inputs) >= 2 and all(t.dtype == "Int8" for t in self.inputs[:2])


def parse_layers(layer_log: str) -> list[EngineLayer]:
    """Every layer line of a `Layers:` message, in engine order."""
    layers = []
    for line in layer_log.splitlines():
        if not line.startswith("Name: "):
            continue
        name = line[len("Name: "):line.index(", LayerType: ")] if ", LayerType: " in line else line[6:]
        layer_type = re.search(r"LayerType: ([^,]+)", line)
        sections = {key: tuple(_tensors(body)) for key, body in _SECTION.findall(line)}
        metadata = line[line.index("Metadata: ") + len("Metadata: "):] if "Metadata: " in line else ""
        layers.append(EngineLayer(name, layer_type.group(1).strip() if layer_type else "", sections.get("Inputs", ()),
                                  sections.get("Constants", ()), sections.get("Outputs", ()),
                                  _onnx_nodes(metadata)))
    return layers


def _onnx_nodes(metadata: str) -> tuple[str, ...]:
    # entries are `[ONNX Layer: name]`, separated by the ASCII unit separator \x1f in TensorRT-RTX
    nodes = []
    for entry in re.split(r"\x1f|\](?=\[ONNX Layer: )", metadata.strip()):
        entry = entry.strip()
        if entry.startswith(_ONNX_PREFIX):
            entry = entry[len(_ONNX_PREFIX):]
            nodes.append(entry[:-1] if entry.endswith("]") else entry)
    return tuple(dict.fromkeys(nodes))


def _tensors(body: str):
    for chunk in body.split("}"):
        dtype = _DATATYPE.search(chunk)
        if dtype is None:
            continue
        dims = _DIMENSIONS.search(chunk)
        values = tuple(int(d) for d in dims.group(1).split(",") if d) if dims else ()
        yield TensorInfo(dtype.group(1), values)


def _volume(dims: tuple[int, ...]) -> int:
    total = 1
    for d in dims:
        total *= max(d, 1)
    return total
