import numpy as np
import pytest

from helpers import parse_model
from qcompiler.ir import Graph


def _chain():
    return parse_model("""
    g (float[2, 4] x) => (float[2, 4] y, float[2, 4] z) {
        a = Relu (x)
        b = Neg (a)
        y = Abs (b)
        z = Sigmoid (a)
    }""")


def test_unnamed_nodes_get_deterministic_unique_names():
    first, second = Graph(_chain()), Graph(_chain())
    names = [n.name for n in first.nodes]
    assert len(set(names)) == len(names) and all(names)
    assert names == [n.name for n in second.nodes]


def test_new_name_avoids_existing_tensor_and_node_names():
    graph = Graph(_chain())
    assert graph.new_name("a") == "a_1"
    assert graph.new_name("a") == "a_2"
    assert graph.new_name("fresh") == "fresh"


def test_replace_all_uses_rewires_consumers_and_outputs():
    graph = Graph(_chain())
    tensors = graph.tensors()
    neg = next(n for n in graph.nodes if n.op == "Neg")
    replacement = graph.add_node("Identity", [tensors["a"]], "copy").outputs[0]
    graph.replace_all_uses(tensors["a"], replacement, keep=[graph.nodes[-1]])
    assert neg.inputs[0] is replacement
    sigmoid = next(n for n in graph.nodes if n.op == "Sigmoid")
    assert sigmoid.inputs[0] is replacement


def test_remove_nodes_refuses_when_outputs_are_still_used_and_changes_nothing():
    graph = Graph(_chain())
    relu = next(n for n in graph.nodes if n.op == "Relu")
    before = [n.name for n in graph.nodes]
    with pytest.raises(ValueError, match="still used"):
        graph.remove_nodes([relu])
    assert [n.name for n in graph.nodes] == before
    assert relu.outputs  # links untouched


def test_remove_nodes_refuses_graph_outputs():
    graph = Graph(_chain())
    abs_node = next(n for n in graph.nodes if n.op == "Abs")
    with pytest.raises(ValueError, match="graph output"):
        graph.remove_nodes([abs_node])


def test_networkx_view_and_topological_order():
    graph = Graph(_chain())
    view = graph.networkx_view()
    relu = next(n for n in graph.nodes if n.op == "Relu").name
    neg = next(n for n in graph.nodes if n.op == "Neg").name
    assert view.edges[relu, neg]["tensor"] == "a"
    order = graph.topological_order()
    assert order.index(relu) < order.index(neg)


def test_constant_value_reads_initializers_and_constant_nodes():
    model = parse_model("""
    g (float[2] x) => (float[2] y) {
        c = Constant <value = float[2] {1.0, 2.0}> ()
        s = Add (x, c)
        y = Mul (s, w)
    }""", {"w": np.array([3.0, 4.0], np.float32)})
    graph = Graph(model)
    tensors = graph.tensors()
    np.testing.assert_array_equal(graph.constant_value(tensors["c"]), [1.0, 2.0])
    np.testing.assert_array_equal(graph.constant_value(tensors["w"]), [3.0, 4.0])
    assert graph.constant_value(tensors["x"]) is None


def test_to_runtime_model_hands_large_weights_over_as_arrays():
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)  # 8 KiB: handed over as an array
    bias = rng.standard_normal(32).astype(np.float32)  # 128 B: stays inline
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 64])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 32])
    nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["xw"]), onnx.helper.make_node("Add", ["xw", "b"], ["y"])]
    inits = [onnx.numpy_helper.from_array(weight, "w"), onnx.numpy_helper.from_array(bias, "b")]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y], inits),
                                   opset_imports=[onnx.helper.make_opsetid("", 13)])
    graph = Graph(model)
    before = graph.to_model().SerializeToString()

    stripped, weights = graph.to_runtime_model()

    assert list(weights) == ["w"] and np.array_equal(weights["w"], weight)
    declared = {init.name: init for init in stripped.graph.initializer}
    assert declared["w"].data_location == onnx.TensorProto.EXTERNAL and not declared["w"].raw_data
    assert list(declared["w"].dims) == [64, 32]
    assert graph.to_model().SerializeToString() == before  # the graph keeps its weights
    options = ort.SessionOptions()
    options.add_external_initializers(["w"], [ort.OrtValue.ortvalue_from_numpy(weights["w"])])
    session = ort.InferenceSession(stripped.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = rng.standard_normal((2, 64)).astype(np.float32)
    expected = ort.InferenceSession(before, providers=["CPUExecutionProvider"]).run(None, {"x": feed})[0]
    assert np.array_equal(session.run(None, {"x": feed})[0], expected)
