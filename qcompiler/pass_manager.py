"""Runs an ordered list of passes, records what each changed, and in debug mode checks the graph
after every pass so a broken graph is blamed on the pass that broke it."""

from __future__ import annotations

from typing import Callable, Sequence

import onnx

from .context import CompileContext
from .errors import GraphCheckError
from .ir import Graph
from .passes.base import Pass, PassResult, StatisticRequest

# Measures statistics on the graph as it is now and stores them in the context.
StatisticsProvider = Callable[[Graph, list[StatisticRequest], CompileContext], None]


class PassManager:
    def __init__(self, passes: Sequence[Pass], debug_checks: bool = False, max_iterations: int = 1,
                 statistics: StatisticsProvider | None = None):
        self.passes = list(passes)
        self.statistics = statistics
        self.debug_checks = debug_checks
        # >1 re-runs the whole list until no pass changes anything (a fixed point).
        self.max_iterations = max_iterations

    def run(self, graph: Graph, context: CompileContext) -> bool:
        modified_any = False
        for _ in range(self.max_iterations):
            modified_round = False
            for current in self.passes:
                self._provide_statistics(current, graph, context)
                result: PassResult = current.run(graph, context)
                context.summary.pass_changes.append((current.name, list(result.changes)))
                modified_round |= result.modified
                if self.debug_checks:
                    check_graph(graph, after=current.name)
            modified_any |= modified_round
            if not modified_round:
                break
        return modified_any

    def _provide_statistics(self, current: Pass, graph: Graph, context: CompileContext) -> None:
        missing = [request for request in current.statistics_needed(graph, context)
                   if not context.has_statistic(request.tensor, request.kind, request.axis)]
        if not missing:
            return
        if self.statistics is None:
            raise RuntimeError(f"pass '{current.name}' needs {len(missing)} statistics but no calibration stage is attached")
        self.statistics(graph, missing, context)


def check_graph(graph: Graph, after: str) -> None:
    """onnx.checker (full) plus strict shape inference; raises GraphCheckError naming the pass."""
    model = graph.to_model()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as error:  # noqa: BLE001 - checker raises several types
        raise GraphCheckError(f"pass '{after}' produced an invalid graph: {str(error).strip().splitlines()[0]}") from None
