"""Rewrites of the float model that ONNX Runtime runs to calibrate: same function, less time.

They apply only to the calibration session's copy of the model (`Graph.to_runtime_model`), never to
the compiled output, and never touch a tensor the calibration observes or a graph output, so every
observed activation keeps its name and its value up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def fuse_decomposed_hard_swish(model: onnx.ModelProto, observed: set[str]) -> int:
    """Replace x * Clip(x + 3, 0, 6) / 6 by x * HardSigmoid(x) (alpha 1/6, beta 0.5), in place;
    returns how many were replaced.

    Matches: Add(x, 3) -> Clip(., 0, 6) -> Mul(x, .) -> Div(., 6), operands in either order, the
    constants as initializers or Constant nodes, min and max given as Clip inputs (opset >= 11).
    This is how Paddle2ONNX writes hard_swish (24 times in ocr-det, 28 in ocr-rec); ONNX Runtime
    runs the four elementwise ops, and the layout reorders around them, separately: 7-11% of a
    1-thread run of those models. Skipped when an intermediate of the pattern is observed, is a
    graph output or has another consumer. Guarantees: the Div's output keeps its name; its value
    equals the original within float rounding (HardSigmoid computes x/6 + 0.5 instead of
    (x + 3)/6); on ocr-det and ocr-rec the calibrated min-max ranges moved by 2e-6 relative at most.
    """
    graph = model.graph
    producer, consumers = _producers_and_consumers(graph)
    constants = _ScalarConstants(graph, producer)
    protected = observed | {output.name for output in graph.output}
    dropped: list[int] = []
    for divide_index, divide in enumerate(graph.node):
        match = _match(graph, divide, producer, constants)
        if match is None:
            continue
        x, (add_index, clip_index, multiply_index) = match
        pattern = [graph.node[index] for index in (add_index, clip_index, multiply_index)]
        if any(node.output[0] in protected or len(consumers.get(node.output[0], ())) != 1 for node in pattern):
            continue
        # Edited in place (rebuilding the node list would copy every weight held by a Constant node):
        # the Clip becomes the gate HardSigmoid(x), the Mul takes over the Div's output.
        clip, multiply = pattern[1], pattern[2]
        clip.op_type = "HardSigmoid"
        del clip.input[:]
        clip.input.append(x)
        clip.attribute.extend([onnx.helper.make_attribute("alpha", 1.0 / 6.0), onnx.helper.make_attribute("beta", 0.5)])
        multiply.output[0] = divide.output[0]
        dropped += [add_index, divide_index]
    delete_in_place(graph.node, sorted(dropped, reverse=True))
    return len(dropped) // 2


def fold_scale_shift_into_conv(model: onnx.ModelProto, observed: set[str]) -> int:
    """Fold Conv -> Mul(., s) -> Add(., t), s and t constants per output channel or scalar, into the
    Conv's weights and bias, in place; returns how many were folded.

    Paddle2ONNX writes each re-parameterised MobileOne branch so (28 times in ocr-det and ocr-rec,
    s and t of shape [1]), and ONNX Runtime runs both ops and a layout reorder for each: 8-10% of a
    1-thread run of those models after the hard swish rewrite. Requires the weights (and bias, if any) as
    inline constants (initializers or Constant nodes), and the Conv's and the Mul's outputs used
    once, not observed and not graph outputs. Guarantees: the Add's output keeps its name and its
    value within float rounding (W * s instead of (x * W) * s); the folded weights are new
    initializers, and the original ones go only when nothing else reads them.
    """
    graph = model.graph
    producer, consumers = _producers_and_consumers(graph)
    constants = _ScalarConstants(graph, producer)
    protected = observed | {output.name for output in graph.output}
    dropped: list[int] = []
    unused: set[str] = set()
    for conv in graph.node:
        if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2:
            continue
        chain = _single_consumer_chain(graph, conv.output[0], ("Mul", "Add"), consumers, protected)
        if chain is None:
            continue
        (multiply_index, scale_name), (add_index, shift_name) = chain
        weight = constants.array(conv.input[1])
        bias = constants.array(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else np.zeros(0, np.float32)
        if weight is None or bias is None or weight.dtype != np.float32 or weight.ndim < 3:
            continue
        channels = weight.shape[0]
        scale, shift = _per_channel(constants.array(scale_name), channels), _per_channel(constants.array(shift_name), channels)
        if scale is None or shift is None:
            continue
        folded_weight = (weight * scale.reshape((channels,) + (1,) * (weight.ndim - 1))).astype(np.float32)
        folded_bias = ((bias if bias.size else np.zeros(channels, np.float32)) * scale + shift).astype(np.float32)
        prefix = f"{graph.node[add_index].output[0]}.folded"
        for suffix, values in (("weight", folded_weight), ("bias", folded_bias)):
            tensor = graph.initializer.add()  # filled in place: from_array + extend would copy it again
            tensor.name, tensor.data_type, tensor.raw_data = f"{prefix}_{suffix}", onnx.TensorProto.FLOAT, values.tobytes()
            tensor.dims.extend(values.shape)
        replaced = [name for name in conv.input[1:] if name and len(consumers.get(name, [])) == 1]
        del conv.input[1:]
        conv.input.extend([f"{prefix}_weight", f"{prefix}_bias"])
        conv.output[0] = graph.node[add_index].output[0]
        dropped += [multiply_index, add_index]
        unused.update(replaced)  # the original weights, when nothing else reads them
    folded = len(dropped) // 2
    dropped += [producer[name] for name in unused if name in producer and graph.node[producer[name]].op_type == "Constant"]
    delete_in_place(graph.node, sorted(dropped, reverse=True))
    delete_in_place(graph.initializer, [index for index in range(len(graph.initializer) - 1, -1, -1)
                                        if graph.initializer[index].name in unused])
    return folded


def decompose_softmax_off_last_axis(model: onnx.ModelProto, observed: set[str]) -> int:
    """Replace a Softmax over an axis other than the last by ReduceMax, Sub, Exp, ReduceSum and Div
    over that axis, in place; returns how many were replaced.

    ONNX Runtime computes such a Softmax by moving the axis to the end and back: on a one-thread run
    of yolo, its one Softmax (the box head's DFL, axis 1 of [1, 16, 4, 2100]) takes 0.74 ms of 12,
    where the five ops take 0.12 ms. Matches Softmax of opset >= 13 (one axis; before 13 the axis
    meant "flatten from here") whose input rank is known without shape inference: the input comes
    from a Transpose (rank = len(perm)) or a Reshape to a constant shape. Guarantees: the Softmax's
    output keeps its name (observed or not) and its value within float rounding (exp(x - max) /
    sum, as ONNX Runtime computes it: 5e-7 relative on yolo's); the new tensors' names derive from
    it. `observed` is not needed (no observed tensor changes) and is taken for a uniform signature.
    """
    del observed
    graph = model.graph
    opset = _default_opset(model)
    if opset < 13:
        return 0
    producer, _ = _producers_and_consumers(graph)
    constants = _ScalarConstants(graph, producer)
    matches = []
    for index, node in enumerate(graph.node):
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        rank = _known_rank(graph, node.input[0], producer, constants)
        axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), -1)
        if rank is not None and -rank <= axis < rank and axis % rank != rank - 1:
            matches.append((index, axis % rank))
    for index, axis in reversed(matches):  # inserting before a later match leaves earlier indices valid
        softmax = graph.node[index]
        x, y = softmax.input[0], softmax.output[0]
        names = {part: f"{y}.softmax_{part}" for part in ("max", "shifted", "exp", "sum", "axes")}
        axes = graph.initializer.add()
        axes.name, axes.data_type = names["axes"], onnx.TensorProto.INT64
        axes.dims.append(1)
        axes.int64_data.append(axis)
        reduce_max = (onnx.helper.make_node("ReduceMax", [x, names["axes"]], [names["max"]], keepdims=1) if opset >= 18
                      else onnx.helper.make_node("ReduceMax", [x], [names["max"]], axes=[axis], keepdims=1))
        before = [reduce_max,
                  onnx.helper.make_node("Sub", [x, names["max"]], [names["shifted"]]),
                  onnx.helper.make_node("Exp", [names["shifted"]], [names["exp"]]),
                  onnx.helper.make_node("ReduceSum", [names["exp"], names["axes"]], [names["sum"]], keepdims=1)]
        softmax.op_type = "Div"
        del softmax.input[:]
        softmax.input.extend([names["exp"], names["sum"]])
        del softmax.attribute[:]
        for offset, node in enumerate(before):
            graph.node.insert(index + offset, node)
    return len(matches)


def _default_opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def _known_rank(graph: onnx.GraphProto, name: str, producer: dict[str, int], constants: "_ScalarConstants") -> int | None:
    """Rank of `name` when its producer states it: a Transpose with perm, a Reshape to a constant
    shape; else None."""
    if name not in producer:
        return None
    node = graph.node[producer[name]]
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose":
        perm = next((list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"), None)
        return len(perm) if perm else None
    if node.op_type == "Reshape" and len(node.input) == 2:
        shape = constants.array(node.input[1])
        return int(shape.size) if shape is not None and shape.ndim == 1 else None
    return None


def _single_consumer_chain(graph: onnx.GraphProto, start: str, op_types: tuple[str, ...],
                           consumers: dict[str, list[int]], protected: set[str]) -> list[tuple[int, str]] | None:
    """[(node index, its other input)] for the binary nodes of `op_types`, in order, that each take the
    previous tensor (from `start`) as their only unprotected use, else None."""
    chain, tensor = [], start
    for op_type in op_types:
        users = consumers.get(tensor, [])
        if tensor in protected or len(users) != 1:
            return None
        node = graph.node[users[0]]
        if node.op_type != op_type or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            return None
        chain.append((users[0], node.input[1] if node.input[0] == tensor else node.input[0]))
        tensor = node.output[0]
    return chain


def _per_channel(values: np.ndarray | None, channels: int) -> np.ndarray | None:
    """`values` as one float32 per output channel, when it is a scalar or has `channels` entries on
    the channel axis of an NCHW tensor (shape [C, 1, ...] or [1, C, 1, ...]), else None."""
    if values is None or values.dtype != np.float32:
        return None
    if values.size == 1:
        return np.full(channels, values.reshape(-1)[0], np.float32)
    squeezed = values.reshape([dim for dim in values.shape if dim != 1])
    channel_axis_ok = values.ndim >= 3 and values.shape[-3] == channels and values.size == channels
    return squeezed.astype(np.float32) if channel_axis_ok else None


def _producers_and_consumers(graph: onnx.GraphProto) -> tuple[dict[str, int], dict[str, list[int]]]:
    """Index of the node producing each tensor, and indices of the nodes reading it."""
    producer: dict[str, int] = {}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            producer[name] = index
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    return producer, consumers


def delete_in_place(items, descending_indices: list[int]) -> None:
    """Delete items[i] for the given indices (in descending order) from a repeated protobuf field,
    one slice per run of neighbours: rebuilding the list would copy every node and weight."""
    run_end = None
    for position, index in enumerate(descending_indices):
        if run_end is None:
            run_end = index + 1
        following = descending_indices[position + 1] if position + 1 < len(descending_indices) else None
        if following != index - 1:
            del items[index:run_end]
            run_end = None


def _match(graph: onnx.GraphProto, divide: onnx.NodeProto, producer: dict[str, int],
           constants: "_ScalarConstants") -> tuple[str, tuple[int, int, int]] | None:
    """(x, indices of the Add, Clip and Mul) when `divide` ends a decomposed hard swish, else None."""
    def produced(name: str, op_type: str, inputs: int) -> int | None:
        index = producer.get(name)
        if index is None:
            return None
        node = graph.node[index]
        return index if node.op_type == op_type and node.domain in ("", "ai.onnx") and len(node.input) == inputs else None

    if divide.op_type != "Div" or divide.domain not in ("", "ai.onnx") or constants.get(divide.input[1]) != 6.0:
        return None
    multiply_index = produced(divide.input[0], "Mul", 2)
    if multiply_index is None:
        return None
    multiply = graph.node[multiply_index]
    for x, clipped in (multiply.input, multiply.input[::-1]):
        clip_index = produced(clipped, "Clip", 3)
        if clip_index is None or graph.node[clip_index].attribute:
            continue
        clip = graph.node[clip_index]
        if constants.get(clip.input[1]) != 0.0 or constants.get(clip.input[2]) != 6.0:
            continue
        add_index = produced(clip.input[0], "Add", 2)
        if add_index is None or x not in graph.node[add_index].input:
            continue
        add = graph.node[add_index]
        other = add.input[1] if add.input[0] == x else add.input[0]
        if constants.get(other) == 3.0:
            return x, (add_index, clip_index, multiply_index)
    return None


class _ScalarConstants:
    """Values of inline constants (initializers and Constant node outputs) by name, looked up on
    demand (most Constant nodes hold weights that no rewrite asks about); `get` only for one-element
    floats."""

    def __init__(self, graph: onnx.GraphProto, producer: dict[str, int]) -> None:
        self.graph = graph
        self.producer = producer
        self.initializers = {tensor.name: index for index, tensor in enumerate(graph.initializer)}
        self.found: dict[str, float | None] = {}

    def get(self, name: str) -> float | None:
        if name not in self.found:
            tensor = self._tensor(name)
            scalar = (tensor is not None and all(dim == 1 for dim in tensor.dims)
                      and tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE))
            self.found[name] = float(numpy_helper.to_array(tensor).reshape(-1)[0]) if scalar else None
        return self.found[name]

    def array(self, name: str) -> np.ndarray | None:
        """The value of an inline constant of any shape, else None."""
        tensor = self._tensor(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def _tensor(self, name: str) -> onnx.TensorProto | None:
        tensor = None
        if name in self.initializers:
            tensor = self.graph.initializer[self.initializers[name]]
        elif name in self.producer:
            node = self.graph.node[self.producer[name]]
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                tensor = node.attribute[0].t
        return None if tensor is None or tensor.data_location == onnx.TensorProto.EXTERNAL else tensor


# What the calibration stage applies to its copy of the model, in this order.
RUNTIME_REWRITES = (fuse_decomposed_hard_swish, fold_scale_shift_into_conv, decompose_softmax_off_last_axis)
