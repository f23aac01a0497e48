"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before quantizing.

For a layer X @ W, input channel j of X is divided by s_j and row j of W multiplied by s_j, which
leaves X @ W unchanged in float while flattening the few huge activation channels transformers
have, so per-tensor int8 activations lose less. s_j = max|X_j|^alpha / max|W_j|^(1-alpha).

max|W_j| is measured in units of the weight's quantization ranges (`weight_row_extent`). The
paper quantizes weights per tensor, where that is the plain row maximum up to a constant factor,
which s does not care about. With per-output-channel weights, scaling column n changes nothing,
so what matters is how much of column n's range row j takes: max_n |W_jn| / max_k |W_kn|. The plain
row maximum made alpha 0.5 worse than no smoothing on MiniLM: in the FFN output projection,
activation channel 856 (24.7, median channel 1.2) carries the single largest weight (7.9 in one
column; the row's median |w| is 0.005), so that channel got s = 1.8 and still set the per-tensor
range, while every ordinary channel, with rows of small absolute weights, was divided by ~2.9: its
quantization step grew ~1.7x and the layer's error 2-3x.

A fixed alpha is also guarded (config.smoothquant_guard): each group's quantized output error
is measured with and without smoothing, on held-out folds of sampled calibration rows (as the
alpha search scores its candidates), and a group whose error smoothing does not lower is left
as it is, recorded in the summary with the ratio.
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
# Candidates are scored on rows outside the statistics they were fitted on. Scored in-sample, no
# row can exceed its channel's calibrated extreme, so clipping is invisible and alpha near 1 (every
# channel at the edge of the range) looks best; on held-out MiniLM rows that choice lost to 0.5,
# by up to 7x in the attention output projections. Contiguous folds: the reservoir keeps
# calibration order until it fills, so a fold is mostly other inputs, not neighbouring tokens.
HELD_OUT_FOLDS = 4
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
    calibration rows, measured by the calibration stage (StatisticRequest kind "row_sample"),
    each fold of the rows scored with the statistics of the others (`layer_errors`). A fixed
    alpha is guarded the same way (config.smoothquant_guard): a group whose error it does not
    lower is left unsmoothed ("unchanged"), so the default does not make a layer worse there.
    Guarantees: float outputs unchanged up to rounding (exact pass); new constants are new
    initializers (shared ones are never edited in place); graph inputs/outputs untouched;
    idempotent: scaled weights are named *_smoothed and never smoothed again; statistics of
    tensors whose values changed are dropped from the context so nothing stale is reused.
    """

    name = "smoothquant"
    kind = PassKind.EXACT

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        config = context.config
        kind = "row_sample" if config.smoothquant_alpha == "search" or config.smoothquant_guard else "channel_absmax"
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
            alpha, act_absmax, reason = self._choose_alpha(group, weights, context)
            if alpha is None:
                context.summary.smoothing.append(SmoothingDecision(group.names, None, "unchanged", reason))
                continue
            scales = smoothing_scales(act_absmax, weight_row_extent(weights, config.per_channel), alpha)
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
    def _choose_alpha(group: Group, weights: list[np.ndarray],
                      context: CompileContext) -> tuple[float | None, np.ndarray | None, str]:
        """(alpha or None to leave the group alone, max|X_j| of the group, why it is left alone)."""
        config = context.config
        if config.smoothquant_alpha != "search" and not config.smoothquant_guard:
            act_absmax = np.max([context.channel_absmax[(t.name, -1)] for t in group.inputs], axis=0)
            return float(config.smoothquant_alpha), act_absmax, ""
        sample = _merged_sample([context.row_samples[(t.name, -1)] for t in group.inputs])
        if config.smoothquant_alpha == "search":
            alpha = search_alpha(sample, weights, config)
            return alpha, sample.channel_absmax, "no alpha of the search beat the unsmoothed layer"
        alpha = float(config.smoothquant_alpha)
        errors = layer_errors(sample, weights, (alpha,), config)
        if errors[alpha] < errors[None]:
            return alpha, sample.channel_absmax, ""
        ratio = f"{errors[alpha] / errors[None]:.2f}x" if errors[None] > 0 else "no error unsmoothed"
        return None, None, (f"guard: alpha {alpha:g} does not lower the layer's quantized output error on "
                            f"{sample.rows.shape[0]} calibration rows ({ratio})")

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


def smoothing_scales(act_absmax: np.ndarray, weight_extent: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^alpha / max|W_j|^(1-alpha), float32, finite and > 0; dead channels keep 1.
    The pass passes `weight_row_extent` as max|W_j| (relative to the weights' quantization ranges)."""
    act = np.asarray(act_absmax, np.float64)
    weight = np.asarray(weight_extent, np.float64)
    scales = np.maximum(act, _DEAD_CHANNEL) ** alpha / np.maximum(weight, _DEAD_CHANNEL) ** (1.0 - alpha)
    dead = (act < _DEAD_CHANNEL) | (weight < _DEAD_CHANNEL) | ~np.isfinite(scales)
    return np.where(dead, 1.0, scales).astype(np.float32)


def weight_row_extent(weights: list[np.ndarray], per_channel: bool) -> np.ndarray:
    """max|W_j| per input channel j over every layer of the group (weights as [K, N]), as a
    fraction of the quantization range each weight lands in: its column's max|W| when weights are
    quantized per output channel, the tensor's max|W| when per tensor."""
    extents = []
    for weight in weights:
        magnitude = np.abs(weight.astype(np.float64))
        ranges = magnitude.max(axis=0, keepdims=True) if per_channel else magnitude.max(keepdims=True)
        extents.append((magnitude / np.maximum(ranges, np.finfo(np.float64).tiny)).max(axis=1))
    return np.max(extents, axis=0)


def _merged_sample(samples: list[RowSample]) -> RowSample:
    if len(samples) == 1:
        return samples[0]
    return RowSample(np.concatenate([s.rows for s in samples]), np.min([s.channel_min for s in samples], axis=0),
                     np.max([s.channel_max for s in samples], axis=0), sum(s.rows_seen for s in samples))


def search_alpha(sample: RowSample, weights: list[np.ndarray], config: QuantConfig) -> float | None:
    """The alpha of ALPHA_GRID minimising the group's held-out quantized output error
    (`layer_errors`) on `sample`, or None when not smoothing at all is at least as good."""
    errors = layer_errors(sample, weights, ALPHA_GRID, config)
    best_alpha = None  # strict improvement only: ties keep the layer as it is
    for alpha in ALPHA_GRID:
        if errors[alpha] < errors[best_alpha]:
            best_alpha = alpha
    return best_alpha


def layer_errors(sample: RowSample, weights: list[np.ndarray], alphas,
                 config: QuantConfig) -> dict[float | None, float]:
    """The group's `layer_error` for each alpha, and under None without smoothing, summed over
    HELD_OUT_FOLDS contiguous folds of the sampled rows, each scored with the channel extremes
    (hence the scales and the per-tensor range) of the other folds."""
    rows = sample.rows.astype(np.float32)
    weight = np.concatenate(weights, axis=1)
    weight_extent = weight_row_extent(weights, config.per_channel)
    errors = dict.fromkeys((None, *alphas), 0.0)
    folds = min(HELD_OUT_FOLDS, rows.shape[0])
    for held_out in np.array_split(np.arange(rows.shape[0]), folds):
        fitted = np.delete(rows, held_out, axis=0) if folds > 1 else rows  # one row: nothing to hold out
        statistics = RowSample(fitted, fitted.min(axis=0), fitted.max(axis=0), fitted.shape[0])
        reference = rows[held_out] @ weight
        for alpha in errors:
            scales = (np.ones(weight.shape[0], np.float32) if alpha is None
                      else smoothing_scales(statistics.channel_absmax, weight_extent, alpha))
            errors[alpha] += layer_error(rows[held_out], weight, reference, scales, statistics, config)
    return errors


def layer_error(rows: np.ndarray, weight: np.ndarray, reference: np.ndarray, scales: np.ndarray,
                sample: RowSample, config: QuantConfig) -> float:
    """Squared error of (Q(X/s) @ Q(W*s)) against X @ W: X/s per tensor over the channel
    extremes of `sample` (exact calibrated ones: outliers not in the rows still set the range;
    `layer_errors` passes those of the other folds), or per token (symmetric int8 per row) when
    the config asks for it; W*s per output channel, or per tensor when per_channel is off."""
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


__all__ = ["ALPHA_GRID", "SmoothQuant", "layer_error", "layer_errors", "search_alpha", "smoothing_scales",
           "weight_row_extent"]
