"""The graph passes edit: onnx-graphsurgeon underneath, a few safe verbs on top.

graphsurgeon has no remove/insert/replace-all-uses helpers, and hand-edited node lists leave stale
producer/consumer links that export silently (see STYLE.md). Passes therefore edit only through the
verbs here, which keep those links consistent and create deterministic names (never uuid), so the
same input always compiles to byte-identical output.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from typing import Iterable, Sequence

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import Message
from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter, update_import_domains
from onnx_graphsurgeon.ir.tensor import SparseValues

Tensor = gs.Tensor
Node = gs.Node
Constant = gs.Constant
Variable = gs.Variable


class Graph:
    """A model's main graph plus the model-level fields graphsurgeon does not carry."""

    def __init__(self, model: onnx.ModelProto):
        self._model_fields = onnx.ModelProto()
        self._model_fields.CopyFrom(model)
        self._model_fields.graph.Clear()
        self.gs = gs.import_onnx(model)
        self._used_names: set[str] = set()
        self._name_counters: Counter[str] = Counter()
        self._name_unnamed_nodes()
        self._refresh_used_names()

    # ---- reading -------------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Node]:
        return self.gs.nodes

    @property
    def opset(self) -> int:
        return int(self.gs.opset)

    def tensors(self) -> dict[str, Tensor]:
        return self.gs.tensors()

    def node_by_name(self, name: str) -> Node:
        for node in self.gs.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    @staticmethod
    def producer(tensor: Tensor) -> Node | None:
        return tensor.inputs[0] if tensor.inputs else None

    @staticmethod
    def consumers(tensor: Tensor) -> list[Node]:
        return list(tensor.outputs)

    def is_graph_output(self, tensor: Tensor) -> bool:
        return any(output.name == tensor.name for output in self.gs.outputs)

    def constant_value(self, tensor: Tensor) -> np.ndarray | None:
        """The value of an initializer or a Constant node's output, else None."""
        if isinstance(tensor, Constant):
            return np.asarray(tensor.values)
        producer = self.producer(tensor)
        if producer is not None and producer.op == "Constant" and "value" in producer.attrs:
            value = producer.attrs["value"]
            return np.asarray(value.values if isinstance(value, Constant) else value)
        return None

    def networkx_view(self) -> nx.DiGraph:
        """A read-only dependency view keyed by node name (gs objects are unhashable).

        Rebuild it after edits; edges carry the tensor name that links the two nodes.
        """
        view = nx.DiGraph()
        for node in self.gs.nodes:
            view.add_node(node.name, op=node.op)
        for node in self.gs.nodes:
            for output in node.outputs:
                for consumer in output.outputs:
                    view.add_edge(node.name, consumer.name, tensor=output.name)
        return view

    def topological_order(self) -> list[str]:
        return list(nx.lexicographical_topological_sort(self.networkx_view()))

    # ---- naming --------------------------------------------------------------------------------
    def new_name(self, base: str) -> str:
        """A name not used by any node or tensor, derived deterministically from `base`."""
        candidate = base
        while candidate in self._used_names:
            self._name_counters[base] += 1
            candidate = f"{base}_{self._name_counters[base]}"
        self._used_names.add(candidate)
        return candidate

    def _name_unnamed_nodes(self) -> None:
        taken = {node.name for node in self.gs.nodes if node.name}
        duplicates = {name for name, count in Counter(n.name for n in self.gs.nodes if n.name).items() if count > 1}
        for index, node in enumerate(self.gs.nodes):
            if not node.name or node.name in duplicates:
                name = f"{node.name or node.op}_{index}"
                while name in taken:
                    name += "_"
                node.name = name
                taken.add(name)

    def _refresh_used_names(self) -> None:
        self._used_names = {node.name for node in self.gs.nodes} | set(self.gs.tensors().keys())

    # ---- editing -------------------------------------------------------------------------------
    def add_initializer(self, base_name: str, values: np.ndarray) -> Constant:
        values = np.asarray(values)  # not ascontiguousarray: it turns 0-d scalars into shape [1]
        return Constant(self.new_name(base_name), values if values.flags.c_contiguous else values.copy())

    def add_node(self, op: str, inputs: Sequence[Tensor], base_name: str, attrs: dict | None = None,
                 output_dtype=None, output_shape=None, num_outputs: int = 1, domain: str | None = None) -> Node:
        """Create a node with fresh output variables and append it (call `toposort` when done)."""
        name = self.new_name(base_name)
        outputs = [Variable(self.new_name(f"{name}_output_{i}" if num_outputs > 1 else f"{name}_output"),
                            dtype=output_dtype, shape=output_shape) for i in range(num_outputs)]
        node = Node(op=op, name=name, attrs=dict(attrs or {}), inputs=list(inputs), outputs=outputs, domain=domain)
        self.gs.nodes.append(node)
        return node

    def replace_input(self, node: Node, old: Tensor, new: Tensor) -> None:
        """Point `node`'s uses of `old` at `new` (every slot that held `old`)."""
        for index, tensor in enumerate(node.inputs):
            if tensor is old or tensor.name == old.name:
                node.inputs[index] = new

    def replace_all_uses(self, old: Tensor, new: Tensor, keep: Iterable[Node] = ()) -> None:
        """Rewire every consumer of `old` (and a graph output named like it) to `new`, except `keep`."""
        kept = {node.name for node in keep}
        for consumer in list(old.outputs):
            if consumer.name not in kept:
                self.replace_input(consumer, old, new)
        for index, output in enumerate(self.gs.outputs):
            if output is old:
                self.gs.outputs[index] = new

    def remove_nodes(self, nodes: Iterable[Node]) -> None:
        """Remove a batch of nodes whose outputs are unused outside the batch; all-or-nothing."""
        batch = list(nodes)
        names = {node.name for node in batch}
        for node in batch:
            for output in node.outputs:
                if self.is_graph_output(output):
                    raise ValueError(f"cannot remove {node.name}: it produces graph output {output.name}")
                outside = [c.name for c in output.outputs if c.name not in names]
                if outside:
                    raise ValueError(f"cannot remove {node.name}: {output.name} is still used by {outside}")
        for node in batch:
            node.inputs.clear()
            node.outputs.clear()
        self.gs.nodes = [node for node in self.gs.nodes if node.name not in names]

    def cleanup(self) -> None:
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        self._refresh_used_names()

    def toposort(self) -> None:
        self.gs.toposort()

    # ---- export --------------------------------------------------------------------------------
    def to_model(self) -> onnx.ModelProto:
        """Export back to a ModelProto keeping the original opset imports, metadata and functions."""
        return self._with_model_fields(gs.export_onnx(self.gs, do_type_check=False))

    def _with_model_fields(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """`model`, exported from graphsurgeon, with the model-level fields graphsurgeon does not
        carry put back (its graph is kept as it is: copying it would copy every weight)."""
        exported_opsets = [onnx.helper.make_opsetid(o.domain, o.version) for o in model.opset_import]
        exported_functions = []
        for function in model.functions:
            exported_functions.append(onnx.FunctionProto())
            exported_functions[-1].CopyFrom(function)
        for descriptor in onnx.ModelProto.DESCRIPTOR.fields:
            if descriptor.name != "graph":
                model.ClearField(descriptor.name)
        for descriptor, value in self._model_fields.ListFields():
            if descriptor.name == "graph":
                continue
            if isinstance(value, Message):
                getattr(model, descriptor.name).CopyFrom(value)
            elif hasattr(value, "extend") or isinstance(value, (list, tuple)):  # a repeated field
                getattr(model, descriptor.name).extend(value)
            else:
                setattr(model, descriptor.name, value)
        del model.opset_import[:]
        model.opset_import.extend(_merged_opsets(self._model_fields.opset_import, exported_opsets, self.opset))
        if not model.functions and exported_functions:
            model.functions.extend(exported_functions)
        return model

    def to_runtime_model(self) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
        """`to_model()` without the weights' bytes, for ONNX Runtime's `add_external_initializers`.

        Every top-level constant of at least RUNTIME_WEIGHT_MIN_BYTES becomes an initializer whose
        data is declared external, and its values are returned by name. Serializing and copying
        a transformer's weights costs more than running it on a calibration set; handed over as
        arrays, ONNX Runtime reads them in place. The graph itself is left as it was. Intermediate
        tensors get no value_info: ONNX Runtime infers their types and shapes itself.
        """
        swapped: list[tuple[Constant, object]] = []
        arrays: dict[str, np.ndarray] = {}
        try:
            for tensor in self.gs.tensors().values():
                if not isinstance(tensor, Constant):
                    continue
                lazy = tensor._values if isinstance(tensor._values, gs.ir.tensor.LazyValues) else None
                if (lazy.nbytes if lazy is not None else tensor.values.nbytes) < RUNTIME_WEIGHT_MIN_BYTES:
                    continue
                values = onnx.numpy_helper.to_array(lazy.tensor) if lazy is not None else tensor.values
                if values.dtype.kind not in "biuf":
                    continue
                arrays[tensor.name] = np.ascontiguousarray(values)
                placeholder = _placeholder(lazy.tensor if lazy is not None else None, tensor.name, values.dtype, values.shape)
                swapped.append((tensor, tensor._values))
                tensor._values = gs.ir.tensor.LazyValues(placeholder)
            return self._with_model_fields(_export_without_value_info(self.gs)), arrays
        finally:
            for tensor, original in swapped:
                tensor._values = original


# Constants at least this large are handed to ONNX Runtime as arrays instead of serialized bytes.
RUNTIME_WEIGHT_MIN_BYTES = 1024
IN_MEMORY_LOCATION = "qcompiler-in-memory"


def _export_without_value_info(graph: gs.Graph) -> onnx.ModelProto:
    """graphsurgeon's `export_onnx` of `graph` without value_info for intermediate tensors, built in
    place (no copy of the graph): about half the export time of a CNN (ocr-det 11 -> 5 ms, ocr-rec
    22 -> 10 ms), paid on every calibration. ONNX Runtime infers the shapes itself; on MiniLM it then
    optimizes a few nodes differently, which moves activations by float rounding (ranges by ~1e-7
    relative), on the CNNs not at all."""
    model = onnx.ModelProto()
    proto = model.graph
    proto.name = graph.name or ""
    proto.node.extend(OnnxExporter.export_node(node) for node in graph.nodes)
    proto.input.extend(OnnxExporter.export_value_info_proto(tensor, False) for tensor in graph.inputs)
    proto.output.extend(OnnxExporter.export_value_info_proto(tensor, False) for tensor in graph.outputs)
    constants = [tensor for tensor in graph.tensors().values() if isinstance(tensor, Constant)]
    proto.initializer.extend(OnnxExporter.export_tensor_proto(tensor) for tensor in constants
                             if not isinstance(tensor._values, SparseValues))
    proto.sparse_initializer.extend(OnnxExporter.export_sparse_tensor_proto(tensor) for tensor in constants
                                    if isinstance(tensor._values, SparseValues))
    model.opset_import.extend(update_import_domains(graph))
    model.functions.extend(OnnxExporter.export_function(function) for function in graph.functions)
    return model


def _placeholder(tensor: onnx.TensorProto | None, name: str, values_dtype: np.dtype, shape) -> onnx.TensorProto:
    """A TensorProto with the constant's name, type and shape whose data is declared external."""
    placeholder = onnx.TensorProto()
    placeholder.name = name
    placeholder.data_type = tensor.data_type if tensor is not None else onnx.helper.np_dtype_to_tensor_dtype(values_dtype)
    placeholder.dims.extend(shape)
    placeholder.data_location = onnx.TensorProto.EXTERNAL
    entry = placeholder.external_data.add()
    entry.key, entry.value = "location", IN_MEMORY_LOCATION
    return placeholder


def _merged_opsets(original, exported, default_version: int) -> list[onnx.OperatorSetIdProto]:
    versions = {("" if entry.domain == "ai.onnx" else entry.domain): entry.version for entry in original}
    for entry in exported:  # a pass may have introduced a new domain (e.g. com.microsoft)
        versions.setdefault(entry.domain, entry.version)
    versions[""] = max(versions.get("", 0), default_version)
    return [onnx.helper.make_opsetid(domain, version) for domain, version in sorted(versions.items())]


def string_attribute(node: Node, name: str, default: str) -> str:
    """A string attribute of `node` as str (graphsurgeon keeps those read from a model as bytes)."""
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """Exact name or shell-style pattern (`/encoder/*/query/*`) match."""
    return any(name == pattern or fnmatch.fnmatchcase(name, pattern) for pattern in patterns)

