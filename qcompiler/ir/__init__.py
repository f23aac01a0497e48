"""qcompiler's intermediate representation: load/save, shape inference, opset upgrades, and the
editable graph with safe mutation verbs."""

from .graph import Constant, Graph, Node, Tensor, Variable, matches_any, string_attribute
from .model_io import check_output_path, load_model, save_model, serialize_for_runtime
from .opset import BLOCKWISE_OPSET, FP8_OPSET, PER_CHANNEL_OPSET, default_opset, ensure_opset
from .shapes import infer_shapes

__all__ = [
    "Constant", "Graph", "Node", "Tensor", "Variable", "matches_any", "string_attribute",
    "check_output_path", "load_model", "save_model", "serialize_for_runtime",
    "BLOCKWISE_OPSET", "FP8_OPSET", "PER_CHANNEL_OPSET", "default_opset", "ensure_opset",
    "infer_shapes",
]
