"""The MiniLM graph we build: exporter form, and numerically equal to an independent numpy BERT."""

import json
from collections import Counter

import numpy as np
import onnx
import pytest
from zoo_helpers import numpy_bert
from onnx import numpy_helper
from safetensors.numpy import load_file

from qcompiler.zoo import data, metrics, minilm, run_onnx, tokenize


def _tiny_inputs():
    input_ids = np.array([[2, 17, 33, 5, 9, 3], [2, 41, 8, 3, 0, 0]], np.int64)
    attention_mask = (np.arange(6)[None] < np.array([[6], [4]])).astype(np.int64)
    token_type_ids = np.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], np.int64)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def test_tiny_bert_graph_matches_numpy_reference(tiny_bert):
    assets, weights, config = tiny_bert
    model = minilm.build_minilm_model(assets)
    onnx.checker.check_model(model, full_check=True)
    inputs = _tiny_inputs()
    (hidden,), = run_onnx(model, [inputs], optimization="disable")
    expected = numpy_bert(weights, config, **inputs)
    valid = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[valid], expected[valid], atol=1e-5)
    # Padding changes nothing for the real tokens of the same sentence.
    (alone,), = run_onnx(model, [{k: v[1:, :4] for k, v in inputs.items()}], optimization="disable")
    np.testing.assert_allclose(alone[0], hidden[1, :4], atol=1e-5)


def test_graph_has_the_torch_exporter_form(tiny_bert):
    assets, _, config = tiny_bert
    model = minilm.build_minilm_model(assets)
    assert model.ir_version == 8 and [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    for value in model.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "sequence"]
    assert [o.name for o in model.graph.output] == ["last_hidden_state"]
    nodes = {node.name: node for node in model.graph.node}
    query = "/encoder/layer.0/attention/self/query"
    assert nodes[f"{query}/MatMul"].input[1].startswith("onnx::MatMul_")
    # The exporter's Linear: Add(bias, MatMul(x, W^T)), bias first.
    assert nodes[f"{query}/Add"].input[:] == ["encoder.layer.0.attention.self.query.bias",
                                             f"{query}/MatMul_output_0"]
    assert list(nodes["/encoder/layer.0/attention/self/Transpose"].attribute[0].ints) == [0, 2, 3, 1]  # K^T
    counts = Counter(node.op_type for node in model.graph.node)
    layers = config["num_hidden_layers"]
    # Per layer: Q, K, V, Q.K^T, probabilities.V, attention output, FFN in, FFN out.
    assert counts["MatMul"] == 8 * layers and counts["LayerNormalization"] == 1 + 2 * layers
    assert counts["Erf"] == counts["Softmax"] == layers and "Gelu" not in counts
    mask_fill = numpy_helper.to_array(next(a.t for a in nodes["/Constant_3"].attribute))
    assert mask_fill == np.float32(-3.4028234663852886e38)  # HF's finfo(float32).min, on purpose
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    query_weight = weights[nodes[f"{query}/MatMul"].input[1]]
    np.testing.assert_array_equal(query_weight, load_file(str(assets / "model.safetensors"))[
        "encoder.layer.0.attention.self.query.weight"].T)


def test_non_bert_config_is_refused(tiny_bert):
    assets, _, config = tiny_bert
    (assets / "config.json").write_text(json.dumps(config | {"hidden_act": "relu"}))
    with pytest.raises(minilm.ZooError, match="not a plain BERT"):
        minilm.build_minilm_model(assets)


@pytest.mark.realmodel
def test_real_minilm_matches_numpy_reference_and_ranks_paraphrases():
    assets = minilm.fetch_minilm_assets()
    config = json.loads((assets / "config.json").read_text())
    weights = load_file(str(assets / "model.safetensors"))
    sentences = ["A man is eating food.", "A man is eating a piece of bread.",
                 "The girl is carrying a baby.", "Frame objects represent execution frames."]
    inputs = tokenize(sentences)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (4, max(inputs["attention_mask"].sum(1)))
    (hidden,), = run_onnx(minilm.fetch_minilm_onnx(), [inputs])
    valid = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(hidden[valid], numpy_bert(weights, config, **inputs)[valid], atol=1e-4)

    embeddings = metrics.mean_pooled(hidden, inputs["attention_mask"])
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = embeddings @ embeddings.T
    assert cosine[0, 1] > 0.6 and cosine[0, 1] > cosine[0, 2] + 0.4 and cosine[0, 1] > cosine[0, 3] + 0.4


@pytest.mark.realmodel
def test_minilm_samples_are_single_sentences_of_varying_length_from_disjoint_sets():
    calibration = data.calibration_samples("minilm", 40)
    evaluation = data.evaluation_samples("minilm", 40)
    for sample in calibration + evaluation:
        assert set(sample) == {"input_ids", "attention_mask", "token_type_ids"}
        assert sample["input_ids"].shape[0] == 1 and sample["attention_mask"].all()
        assert sample["input_ids"][0, 0] == 101 and sample["input_ids"][0, -1] == 102  # [CLS] ... [SEP]
    assert len({s["input_ids"].shape[1] for s in evaluation}) > 5
    calibration_ids = {s["input_ids"].tobytes() for s in calibration}
    assert not any(s["input_ids"].tobytes() in calibration_ids for s in evaluation)
    again = data.calibration_samples("minilm", 40)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(calibration, again))
