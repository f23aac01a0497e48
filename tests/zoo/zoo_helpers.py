"""Helpers for the zoo tests: an independent numpy BERT, and weight perturbation.

A plain module with a name no other test folder uses, because importing from conftest.py is fragile."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper
from scipy.special import erf


def numpy_bert(weights: dict[str, np.ndarray], config: dict, input_ids: np.ndarray,
               attention_mask: np.ndarray, token_type_ids: np.ndarray) -> np.ndarray:
    """HF BertModel's last_hidden_state in float64, written from the weight names, not from the graph.

    Masked keys get -inf before the softmax (not HF's finfo.min), so padding handling is checked
    against the exact answer rather than against the same trick.
    """
    def layer_norm(x, name):
        mean = x.mean(-1, keepdims=True)
        variance = ((x - mean) ** 2).mean(-1, keepdims=True)
        normalised = (x - mean) / np.sqrt(variance + config["layer_norm_eps"])
        return normalised * weights[f"{name}.weight"] + weights[f"{name}.bias"]

    def linear(x, name):
        return x @ weights[f"{name}.weight"].astype(np.float64).T + weights[f"{name}.bias"]

    batch, length = input_ids.shape
    heads = config["num_attention_heads"]
    head_size = config["hidden_size"] // heads
    x = (weights["embeddings.word_embeddings.weight"][input_ids]
         + weights["embeddings.token_type_embeddings.weight"][token_type_ids]
         + weights["embeddings.position_embeddings.weight"][:length][None]).astype(np.float64)
    x = layer_norm(x, "embeddings.LayerNorm")
    for layer in range(config["num_hidden_layers"]):
        prefix = f"encoder.layer.{layer}"
        q, k, v = (linear(x, f"{prefix}.attention.self.{name}").reshape(batch, length, heads, head_size)
                   .transpose(0, 2, 1, 3) for name in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_size)
        scores = np.where(attention_mask[:, None, None, :] > 0, scores, -np.inf)
        probabilities = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        context = (probabilities @ v).transpose(0, 2, 1, 3).reshape(batch, length, -1)
        x = layer_norm(linear(context, f"{prefix}.attention.output.dense") + x, f"{prefix}.attention.output.LayerNorm")
        hidden = linear(x, f"{prefix}.intermediate.dense")
        hidden = 0.5 * hidden * (1.0 + erf(hidden / np.sqrt(2.0)))
        x = layer_norm(linear(hidden, f"{prefix}.output.dense") + x, f"{prefix}.output.LayerNorm")
    return x


def perturb_weights(model: onnx.ModelProto, relative_noise: float, seed: int = 0) -> onnx.ModelProto:
    """A copy of `model` with Gaussian noise of `relative_noise` * std added to every float weight.

    Stands in for a quantized model when testing that the metrics respond to small changes. The
    PaddleOCR models keep their weights in Constant nodes, not initializers, so both are covered.
    """
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    rng = np.random.default_rng(seed)
    tensors = list(noisy.graph.initializer) + [attribute.t for node in noisy.graph.node if node.op_type == "Constant"
                                               for attribute in node.attribute if attribute.name == "value"]
    for tensor in tensors:
        weight = numpy_helper.to_array(tensor)
        if weight.dtype == np.float32 and weight.ndim >= 2:
            weight = weight + rng.normal(0.0, relative_noise * weight.std(), weight.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
    return noisy
