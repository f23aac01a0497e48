"""Compile options: one typed, frozen dataclass with a documented default for every knob."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Mapping

from .errors import ConfigError
from .ir.graph import matches_any


class QType(str, Enum):
    """Integer types a tensor can be quantized to."""

    INT8 = "int8"
    UINT8 = "uint8"


class Target(str, Enum):
    ORT = "ort"
    TENSORRT = "tensorrt"


class BiasMode(str, Enum):
    AUTO = "auto"    # int32 for ONNX Runtime (its QLinearConv fusion wants it), float for TensorRT
    INT32 = "int32"
    FLOAT = "float"


QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
KNOWN_CALIBRATORS = ("minmax", "percentile", "mse", "kl", "entropy")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    target: "ort" (ONNX Runtime CPU) or "tensorrt" (symmetric int8 everywhere, float bias).
    calibrator: activation range estimator for every tensor ("minmax", "percentile", "mse", "kl").
    calibrator_options: keyword options for the calibrator (e.g. {"percentile": 99.99}).
    tensor_calibrators: per-tensor overrides, tensor name or shell pattern -> calibrator name,
        first match wins (e.g. {"/head/*": "minmax"} with calibrator="kl" elsewhere); they use the
        calibrator's default options.
    activation_type: uint8 asymmetric by default, because ONNX Runtime's x86 int8 kernels are
        u8 (activations) x s8 (weights), the form VNNI's vpdpbusd executes natively; int8 makes
        activations symmetric. The tensorrt target always uses int8.
    per_channel: quantize weights per output channel (int8 symmetric). Needs opset 13, to which
        older models are converted.
    bias: keep Conv/Gemm bias in float or quantize it to int32 (scale = input scale x weight scale).
    op_types: the op types whose inputs are quantized.
    exclude_nodes: node names or shell patterns (`/encoder/layer.0/*`) left in float.
    exclude_op_types: op types left in float.
    quantize_activation_matmul: also quantize MatMuls whose two inputs are both activations
        (attention Q.K^T and P.V); off by default because softmax outputs and attention scores lose
        the most accuracy.
    calibration_threads: ONNX Runtime intra-op threads used while calibrating (0 = its default).
    debug_checks: run onnx.checker and shape inference after every pass, naming the pass that broke the graph.
    """

    target: Target = Target.ORT
    calibrator: str = "minmax"
    calibrator_options: Mapping[str, Any] = field(default_factory=dict)
    tensor_calibrators: Mapping[str, str] = field(default_factory=dict)
    activation_type: QType = QType.UINT8
    per_channel: bool = True
    bias: BiasMode = BiasMode.AUTO
    op_types: tuple[str, ...] = QUANTIZABLE_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    quantize_activation_matmul: bool = False
    calibration_threads: int = 0
    debug_checks: bool = False

    def __post_init__(self) -> None:
        for name, enum in (("target", Target), ("activation_type", QType), ("bias", BiasMode)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum(value))
            except ValueError:
                choices = ", ".join(member.value for member in enum)
                raise ConfigError(f"invalid {name} {value!r}; choose one of: {choices}") from None
        for calibrator in (self.calibrator, *dict(self.tensor_calibrators).values()):
            if calibrator not in KNOWN_CALIBRATORS:
                raise ConfigError(f"unknown calibrator {calibrator!r}; choose one of: {', '.join(KNOWN_CALIBRATORS)}")
        object.__setattr__(self, "tensor_calibrators", dict(self.tensor_calibrators))
        unknown_ops = sorted(set(self.op_types) - set(QUANTIZABLE_OP_TYPES))
        if unknown_ops:
            raise ConfigError(f"cannot quantize op types {unknown_ops}; supported: {', '.join(QUANTIZABLE_OP_TYPES)}")
        for name in ("op_types", "exclude_nodes", "exclude_op_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "calibrator_options", dict(self.calibrator_options))
        if self.calibration_threads < 0:
            raise ConfigError("calibration_threads must be >= 0")
        if self.target is Target.TENSORRT:
            # TensorRT INT8 is symmetric only and rejects int32 bias DequantizeLinear.
            object.__setattr__(self, "activation_type", QType.INT8)
            if self.bias is BiasMode.INT32:
                raise ConfigError("the tensorrt target cannot take int32 bias; use bias='float' or 'auto'")

    @property
    def resolved_bias(self) -> BiasMode:
        if self.bias is not BiasMode.AUTO:
            return self.bias
        return BiasMode.FLOAT if self.target is Target.TENSORRT else BiasMode.INT32

    def calibrator_for(self, tensor: str) -> tuple[str, dict[str, Any]]:
        """(calibrator name, options) for one tensor: the first matching override, else the default."""
        for pattern, name in self.tensor_calibrators.items():
            if matches_any(tensor, (pattern,)):
                return name, {}
        return self.calibrator, dict(self.calibrator_options)

    @property
    def symmetric_activations(self) -> bool:
        return self.activation_type is QType.INT8

    def with_options(self, **changes: Any) -> "QuantConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        result = {}
        for item in fields(self):
            value = getattr(self, item.name)
            result[item.name] = value.value if isinstance(value, Enum) else value
        return result
