import numpy as np
import pytest

from helpers import parse_model
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.errors import GraphCheckError
from qcompiler.ir import Graph
from qcompiler.pass_manager import PassManager
from qcompiler.passes import Pass, PassKind, PassResult, StatisticRequest


class RenameOutputs(Pass):
    """Test pass: renames one Relu output each run until none is left to rename (a fixed point)."""

    name = "rename-outputs"
    kind = PassKind.EXACT

    def run(self, graph, context):
        for node in graph.nodes:
            if node.op == "Relu" and not node.outputs[0].name.startswith("renamed"):
                node.outputs[0].name = graph.new_name("renamed")
                return PassResult(True, [node.name])
        return PassResult(False)


class BreakGraph(Pass):
    """Test pass: wires a Relu to a tensor nobody produces, which onnx.checker must reject."""

    name = "break-graph"
    kind = PassKind.EXACT

    def run(self, graph, context):
        from qcompiler.ir import Variable
        graph.nodes[0].inputs[0] = Variable("dangling", dtype=np.float32, shape=[2])
        return PassResult(True, ["broke it"])


class NeedsStatistics(Pass):
    name = "needs-statistics"
    kind = PassKind.EXACT

    def statistics_needed(self, graph, context):
        return [StatisticRequest("a"), StatisticRequest("a", kind="channel_absmax", axis=-1)]

    def run(self, graph, context):
        return PassResult(False)


def _graph():
    return Graph(parse_model("""
    g (float[2] x) => (float[2] y) {
        a = Relu (x)
        y = Relu (a)
    }"""))


def test_records_changes_and_reaches_a_fixed_point():
    context = CompileContext(QuantConfig())
    graph = _graph()
    assert PassManager([RenameOutputs()], max_iterations=5).run(graph, context)
    assert [name for name, changes in context.summary.pass_changes if changes] == ["rename-outputs"] * 2
    assert context.summary.pass_changes[-1] == ("rename-outputs", [])


def test_debug_checks_name_the_pass_that_broke_the_graph():
    with pytest.raises(GraphCheckError, match="pass 'break-graph' produced an invalid graph"):
        PassManager([RenameOutputs(), BreakGraph()], debug_checks=True).run(_graph(), CompileContext(QuantConfig()))


def test_statistics_are_requested_once_before_the_pass_runs():
    calls = []

    def provide(graph, requests, context):
        calls.append([(r.tensor, r.kind) for r in requests])
        context.activation_ranges["a"] = None
        context.channel_absmax[("a", -1)] = np.ones(2)

    context = CompileContext(QuantConfig())
    manager = PassManager([NeedsStatistics(), NeedsStatistics()], statistics=provide)
    manager.run(_graph(), context)
    assert calls == [[("a", "range"), ("a", "channel_absmax")]]
