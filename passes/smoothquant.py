"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before quantizing.

For a layer X @ W, input channel j of X is divided by s_j and row j of W multiplied by s_j, which
leaves X @ W unchanged in float while flattening the few huge activation channels transformers
have, so per-tensor int8 activations lose less. s_j = max|X_j|^alpha / max|W_j|^(1-alpha).
"""

from __future__ import annotations

import numpy as np

from ..calibrators.base import Range
from ..calibrators.rows import RowSample
from ..config import QuantConfig
from ..context import CompileContext, SmoothingDecision
from ..ir import Graph
from ..quant_params import activation_params, quantize, weight_params
from .base import Pass, PassKind, PassResult, StatisticRequest
from .smoothquant_fold import SMOOTHED_SUFFIX, ConstantEdit, Group, find_groups

# alpha candidates of the per-layer search; 0.5 (the paper's default) is one of them, so per
# layer on the calibration rows the search is never worse than the fixed default.
ALPHA_GRID = tuple(round(0.1 * step, 2) for step in range(11))
# max|x| or max|w| below this is a dead channel: it keeps s = 1 (SmoothQuant's clamp is 1e-5).
_DEAD_CHANNEL = 1e-5


class SmoothQuant(Pass):
    """Divides the input channels of constant-weight MatMul/Gemm layers by s and scales the
    weights' rows by s, folding 1/s into the op that produces the activation.

    Matches: the groups of `smoothquant_fold.find_groups` (layers sharing one input, also through
    channel-preserving Reshape/Transpose, share one scale: Q/K/V get one s over all three
    weights). Folds 1/s into LayerNormalization, SimplifiedLayerNormalization, RMSNormalization,
    the decomposed LayerNorm's Mul(gamma)/Add(beta), a constant-weight MatMul/Gemm (with its bias
    Add) or a Mul/Div by a constant; where no producer can absorb it, inserts Mul(X, 1/s) before
    the layers (config smoothquant_unfoldable="mul") or leaves the group alone ("skip").
    alpha: config.smoothquant_alpha, or "search": per group, the candidate of ALPHA_GRID (or no
    smoothing at all) with the smallest squared error of the fake-quantized layer output
    (activation per tensor as configured, weights per channel int8) on a bounded sample of
    calibration rows, measured by the calibration stage (StatisticRequest kind "row_sample").
    Guarantees: float outputs unchanged up to rounding (exact pass); new constants are new
    initializers (shared ones are never edited in place); graph inputs/outputs untouched;
    idempotent: scaled weights are named *_smoothed and never smoothed again; statistics of
    tensors whose values changed are dropped from the context so nothing stale is reused.
    """

    name = "smoothquant"
    kind = PassKind.EXACT

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        kind = "row_sample" if context.config.smoothquant_alpha == "search" else "channel_absmax"
        return [StatisticRequest(tensor.name, kind, -1)
                for group in self._groups(graph, context.config) for tensor in group.inputs]

    def _groups(self, graph: Graph, config: QuantConfig) -> list[Group]:
        groups = find_groups(graph, config)
        if config.smoothquant_unfoldable == "skip":
            return [group for group in groups if group.fold is not None]
        return groups

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        config = context.config
        changes: list[str] = []
        all_groups = find_groups(graph, config)
        for group in all_groups:
            if group.fold is None and config.smoothquant_unfoldable == "skip":
                context.summary.smoothing.append(SmoothingDecision(group.names, None, "skipped", group.unfoldable_reason))
                continue
            weights = [linear.weight_rows(graph) for linear in group.linears]
            if config.smoothquant_alpha == "search":
                sample = _merged_sample([context.row_samples[(t.name, -1)] for t in group.inputs])
                alpha = search_alpha(sample, weights, config)
                act_absmax = sample.channel_absmax
            else:
                alpha = float(config.smoothquant_alpha)
                act_absmax = np.max([context.channel_absmax[(t.name, -1)] for t in group.inputs], axis=0)
            if alpha is None:
                context.summary.smoothing.append(SmoothingDecision(
                    group.names, None, "unchanged", "no alpha of the search beat the unsmoothed layer"))
                continue
            scales = smoothing_scales(act_absmax, _rows_absmax(weights), alpha)
            self._scale_weights(graph, group, scales)
            if group.fold is not None:
                self._fold(graph, group, scales, context)
                action, detail = "folded", group.fold.describe()
            else:
                self._insert_mul(graph, group, scales)
                action, detail = "mul", f"Mul inserted: {group.unfoldable_reason}"
            context.summary.smoothing.append(SmoothingDecision(group.names, alpha, action, detail))
            changes.append(f"{', '.join(group.names)}: alpha {alpha:g}, {detail}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)

    @staticmethod
    def _scale_weights(graph: Graph, group: Group, scales: np.ndarray) -> None:
        for linear in group.linears:
            value = graph.constant_value(linear.weight).astype(np.float32)
            shape = [1] * value.ndim
            shape[linear.input_channel_axis] = -1
            scaled = (value * scales.reshape(shape)).astype(np.float32)
            graph.replace_input(linear.node, linear.weight,
                                graph.add_initializer(f"{linear.weight.name}{SMOOTHED_SUFFIX}", scaled))

    @staticmethod
    def _fold(graph: Graph, group: Group, scales: np.ndarray, context: CompileContext) -> None:
        for edit in group.fold.edits:
            old = edit.node.inputs[edit.index]
            value = _edited_constant(graph.constant_value(old).astype(np.float32), edit, scales)
            graph.replace_input(edit.node, old, graph.add_initializer(f"{old.name}_folded", value))
        # These tensors now hold X / s: statistics measured before (or handed in) are stale.
        for name in group.fold.changed_tensors:
            context.activation_ranges.pop(name, None)
            for table in (context.channel_absmax, context.row_samples):
                for key in [key for key in table if key[0] == name]:
                    del table[key]

    @staticmethod
    def _insert_mul(graph: Graph, group: Group, scales: np.ndarray) -> None:
        inverse = graph.add_initializer(f"{group.root.name}_smooth_scale", (1.0 / scales).astype(np.float32))
        members = {linear.node.name for linear in group.linears}
        for tensor in group.inputs:
            mul = graph.add_node("Mul", [tensor, inverse], f"{tensor.name}_smooth", output_dtype=np.float32,
                                 output_shape=tensor.shape)
            for consumer in list(tensor.outputs):
                if consumer.name in members:
                    graph.replace_input(consumer, tensor, mul.outputs[0])
        graph.toposort()


def _edited_constant(value: np.ndarray, edit: ConstantEdit, scales: np.ndarray) -> np.ndarray:
    factor = scales if edit.transform == "times_s" else 1.0 / scales
    node = edit.node
    if node.op == "Gemm" and edit.index == 1 and int(node.attrs.get("transB", 0)):
        return (value * factor[:, None]).astype(np.float32)  # B is [N, K]: output channels are rows
    return (value * factor).astype(np.float32)  # broadcasts on the last axis (a scalar becomes [K])


def smoothing_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), float32, finite and > 0; dead channels keep 1."""
    act = np.asarray(act_absmax, np.float64)
    weight = np.asarray(weight_absmax, np.float64)
    scales = np.maximum(act, _DEAD_CHANNEL) ** alpha / np.maximum(weight, _DEAD_CHANNEL) ** (1.0 - alpha)
    dead = (act < _DEAD_CHANNEL) | (weight < _DEAD_CHANNEL) | ~np.isfinite(scales)
    return np.where(dead, 1.0, scales).astype(np.float32)


def _rows_absmax(weights: list[np.ndarray]) -> np.ndarray:
    """max|W_j| per input channel over every layer of the group (weights as [K, N])."""
    return np.max([np.abs(weight).max(axis=1) for weight in weights], axis=0)


def _merged_sample(samples: list[RowSample]) -> RowSample:
    if len(samples) == 1:
        return samples[0]
    return RowSample(np.concatenate([s.rows for s in samples]), np.min([s.channel_min for s in samples], axis=0),
                     np.max([s.channel_max for s in samples], axis=0), sum(s.rows_seen for s in samples))


def search_alpha(sample: RowSample, weights: list[np.ndarray], config: QuantConfig) -> float | None:
    """The alpha of ALPHA_GRID minimising the group's quantized output error on `sample`, or
    None when not smoothing at all is at least as good as every candidate."""
    rows = sample.rows.astype(np.float32)
    weight = np.concatenate(weights, axis=1)
    reference = rows @ weight
    weight_absmax = _rows_absmax(weights)
    best_alpha, best_error = None, layer_error(rows, weight, reference, np.ones(weight.shape[0], np.float32), sample, config)
    for alpha in ALPHA_GRID:
        scales = smoothing_scales(sample.channel_absmax, weight_absmax, alpha)
        error = layer_error(rows, weight, reference, scales, sample, config)
        if error < best_error:
            best_alpha, best_error = alpha, error
    return best_alpha


def layer_error(rows: np.ndarray, weight: np.ndarray, reference: np.ndarray, scales: np.ndarray,
                sample: RowSample, config: QuantConfig) -> float:
    """Squared error of (Q(X/s) @ Q(W*s)) against X @ W: X/s per tensor over the exact calibrated
    extremes of every channel (outliers not in the sample still set the range), or per token
    (symmetric int8 per row) when the config asks for it; W*s per channel."""
    smoothed = rows / scales
    if config.per_token_activations:
        row_scale = np.maximum(np.abs(smoothed).max(axis=1, keepdims=True) / 127.0, 1e-12).astype(np.float32)
        quantized_rows = np.rint(smoothed / row_scale) * row_scale
    else:
        low = float(np.min(sample.channel_min / scales))
        high = float(np.max(sample.channel_max / scales))
        activation = activation_params(Range(low, high), config.activation_type)
        quantized_rows = quantize(smoothed, activation).astype(np.float32) - activation.zero_point.astype(np.float32)
        quantized_rows *= activation.scale
    scaled_weight = weight * scales[:, None]
    axis = 1 if config.per_channel else None
    weight_quant = weight_params(scaled_weight, axis)
    dequantized_weight = quantize(scaled_weight, weight_quant).astype(np.float32) * weight_quant.scale.astype(np.float32)
    difference = quantized_rows @ dequantized_weight - reference
    return float(np.einsum("ij,ij->", difference, difference, dtype=np.float64))


__all__ = ["ALPHA_GRID", "SmoothQuant", "layer_error", "search_alpha", "smoothing_scales"]
