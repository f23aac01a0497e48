"""What a pass is: a small named object with one job, reporting whether it changed the graph."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

from ..context import CompileContext
from ..ir import Graph


class PassKind(Enum):
    """Sets how a pass is tested: exact passes keep float results, lossy ones stay within the
    quantization step, lowerings match their QDQ form within one step."""

    EXACT = "exact"
    LOSSY = "lossy"
    LOWERING = "lowering"


@dataclass(frozen=True)
class StatisticRequest:
    """A statistic a pass needs about a tensor of the graph as it is when the pass runs.

    kind "range": the tensor's calibrated range (the configured calibrator);
    kind "channel_absmax": max|x| per channel along `axis` (what SmoothQuant balances);
    kind "row_sample": a bounded uniform sample of the tensor's rows along `axis` plus exact
    per-channel min/max (`calibrators.rows`; SmoothQuant's alpha search scores layers on it).
    """

    tensor: str
    kind: str = "range"
    axis: int | None = None


@dataclass
class PassResult:
    modified: bool
    changes: list[str] = field(default_factory=list)


class Pass(ABC):
    """Subclasses state in their docstring what they match and what they guarantee."""

    name: ClassVar[str]
    kind: ClassVar[PassKind]

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        """Statistics to measure on the current graph before `run`; the compile stage (never the
        pass) runs the model to collect them into `context`."""
        return []

    @abstractmethod
    def run(self, graph: Graph, context: CompileContext) -> PassResult: ...
