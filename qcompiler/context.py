"""What flows between compile stages: the config, calibrated ranges, and the running summary."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .calibrators.base import Range
from .calibrators.rows import RowSample
from .config import QuantConfig


@dataclass(frozen=True)
class NodeDecision:
    """Whether one candidate node was quantized, and why not if it was not."""

    node: str
    op_type: str
    quantized: bool
    detail: str


@dataclass(frozen=True)
class SmoothingDecision:
    """What SmoothQuant did for one group of linear layers sharing an input activation."""

    nodes: tuple[str, ...]
    alpha: float | None      # None: left as it was (the search or the guard found smoothing did not help)
    action: str              # "folded", "mul", "skipped" or "unchanged"
    detail: str              # e.g. "into LayerNormalization /ln" or why nothing was foldable


@dataclass
class CompileSummary:
    """A record of what compilation did, for users (CLI table) and tests."""

    decisions: list[NodeDecision] = field(default_factory=list)
    pass_changes: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    smoothing: list[SmoothingDecision] = field(default_factory=list)
    calibration_samples: int = 0
    calibrated_tensors: int = 0
    # Wall seconds per calibration phase, summed over calibration passes: "prepare" (graph export,
    # outputs exposed), "session" (ONNX Runtime session), "samples" (reading and running them, and
    # the calibrators' updates), "release" (freeing the session and the runtime copy of the model),
    # "ranges" (each calibrator's range search).
    calibration_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def quantized(self) -> list[NodeDecision]:
        return [d for d in self.decisions if d.quantized]

    @property
    def skipped(self) -> list[NodeDecision]:
        return [d for d in self.decisions if not d.quantized]

    def counts_by_op(self) -> dict[str, tuple[int, int]]:
        """op type -> (quantized, skipped)."""
        counts: dict[str, list[int]] = {}
        for decision in self.decisions:
            entry = counts.setdefault(decision.op_type, [0, 0])
            entry[0 if decision.quantized else 1] += 1
        return {op: (q, s) for op, (q, s) in sorted(counts.items())}


@dataclass
class CompileContext:
    """Read by passes: the options and the statistics the calibration stage measured."""

    config: QuantConfig
    activation_ranges: dict[str, Range] = field(default_factory=dict)
    channel_absmax: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    row_samples: dict[tuple[str, int], RowSample] = field(default_factory=dict)
    summary: CompileSummary = field(default_factory=CompileSummary)

    def has_statistic(self, tensor: str, kind: str, axis: int | None) -> bool:
        if kind == "range":
            return tensor in self.activation_ranges
        if kind == "row_sample":
            return (tensor, axis) in self.row_samples
        return (tensor, axis) in self.channel_absmax
