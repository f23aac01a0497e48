"""Parsing the builder's layer table (a line copied from a real TensorRT-RTX 1.7 build log)."""

from qcompiler.tensorrt.layers import parse_layers

LINE = ("Name: node_of_c_myl0_1, LayerType: correlation, Inputs: [ { Name: a_myl0, Dimensions: [1,16,32,32], "
        "Strides: [16384,1,512,16], StrideOrder: [3,0,2,1], Datatype: Int8, Format: (NHWC) Channel major format }], "
        "Constants: [ { Name: w_myl0, Dimensions: [16,16,3,3], Strides: [144,1,48,16], StrideOrder: [3,0,2,1], "
        "Datatype: Int8, Format: (NHWC) Channel major format }, { Name: s_myl0, Dimensions: [1,16,1,1], Strides: "
        "[16,1,16,16], StrideOrder: [3,0,2,1], Datatype: Float, Format: (NHWC) Channel major format }], Outputs: [ { "
        "Name: out_myl0, Dimensions: [1,16,32,32], Strides: [16384,1,512,16], StrideOrder: [3,0,2,1], Datatype: Float, "
        "Format: (NHWC) Channel major format }], TacticName: __myelin_CASK_STUB, StreamId: 0, "
        "Metadata: [ONNX Layer: node_of_c]\x1f[ONNX Layer: node_of_d]\x1f[ONNX Layer: node_of_wd]")
ATTENTION = ("Name: _gemm_mha_v2_myl0_6, LayerType: kgen, Inputs: [ { Name: q, Dimensions: [12,32,32], Datatype: Int8 }, "
             "{ Name: k, Dimensions: [12,32,32], Datatype: Int8 }, { Name: mask, Dimensions: [1,1,32], Datatype: Float }, "
             "{ Name: v, Dimensions: [12,32,32], Datatype: Int8 }], Constants: [], Outputs: [ { Name: o, Dimensions: "
             "[12,32,32], Datatype: Float }], TacticName: t, StreamId: 0, Metadata: [ONNX Layer: /attn/MatMul]")


def test_layer_line_fields():
    (layer,) = parse_layers("Layers:\n" + LINE + "\n")
    assert layer.name == "node_of_c_myl0_1" and layer.layer_type == "correlation"
    assert layer.input_dtypes == ("Int8",)
    assert layer.weight_dtype == "Int8"  # the [16,16,3,3] constant, not the per-channel scale vector
    assert [o.dtype for o in layer.outputs] == ["Float"]
    assert layer.onnx_nodes == ("node_of_c", "node_of_d", "node_of_wd")
    assert layer.is_compute and layer.runs_int8


def test_float_weight_or_input_is_not_int8():
    assert not parse_layers(LINE.replace("Datatype: Int8, Format: (NHWC) Channel major format }, {", "Datatype: Float, Format: x }, {", 1)
                            .replace("Inputs: [ { Name: a_myl0, Dimensions: [1,16,32,32], Strides: [16384,1,512,16], "
                                     "StrideOrder: [3,0,2,1], Datatype: Int8", "Inputs: [ { Name: a_myl0, Dimensions: "
                                     "[1,16,32,32], Strides: [16384,1,512,16], StrideOrder: [3,0,2,1], Datatype: Float"))[0].runs_int8
    weight_float = LINE.replace("StrideOrder: [3,0,2,1], Datatype: Int8, Format: (NHWC) Channel major format }, { Name: s_myl0",
                                "StrideOrder: [3,0,2,1], Datatype: Float, Format: (NHWC) Channel major format }, { Name: s_myl0")
    assert parse_layers(weight_float)[0].weight_dtype == "Float"
    assert not parse_layers(weight_float)[0].runs_int8


def test_fused_attention_kernel_counts_as_int8_with_a_float_mask():
    (layer,) = parse_layers(ATTENTION)
    assert layer.is_attention and layer.is_compute and layer.runs_int8
    assert not parse_layers(ATTENTION.replace("Name: v, Dimensions: [12,32,32], Datatype: Int8",
                                              "Name: v, Dimensions: [12,32,32], Datatype: Float"))[0].runs_int8
