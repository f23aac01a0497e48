"""The ONNX Runtime target's section of the pipeline: which placement, lowering and clean-up
passes run for a config (chosen from measurements in benchmarks/results/latency.md)."""

from __future__ import annotations

from ..config import OutputFormat, QuantConfig, QuantMode
from .base import Pass
from .cleanup import RemoveIdentities, RemoveRedundantQDQ, ShapeBeforeDequantize
from .ort_dynamic import OrtDynamicMatMul
from .ort_fold import FoldAffineIntoConv, FoldAffineIntoNextConv, KeepLayerNormUnfused
from .ort_lowering import LowerMatMulIntegerToFloat, NearestUpsampleAsExpand
from .ort_placement import OrtQuantizeOutputs


def ort_passes(config: QuantConfig) -> list[Pass]:
    """Passes appended after QDQ insertion for target 'ort'."""
    if config.mode is QuantMode.DYNAMIC:
        return [OrtDynamicMatMul(), RemoveIdentities(), KeepLayerNormUnfused()]
    if config.format is OutputFormat.QDQ:
        return []
    # qoperator and auto: every measured op type ran faster as ORT's integer kernel than in float
    # (benchmarks/results/latency.md), so auto closes every group ORT can lower.
    return [OrtQuantizeOutputs(), LowerMatMulIntegerToFloat(), RemoveRedundantQDQ(), NearestUpsampleAsExpand(),
            ShapeBeforeDequantize(), RemoveIdentities(), KeepLayerNormUnfused()]


def ort_prepare_passes(config: QuantConfig) -> list[Pass]:
    """Float rewrites run before QDQ insertion for target 'ort' (static mode)."""
    if config.mode is QuantMode.DYNAMIC or config.format is OutputFormat.QDQ:
        return []
    return [FoldAffineIntoConv(), FoldAffineIntoNextConv()]
