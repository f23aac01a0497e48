"""Compile options: one typed, frozen dataclass with a documented default for every knob."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from enum import Enum
from typing import Any, Mapping

from .cpu import cpu_needs_reduced_range
from .errors import ConfigError
from .ir.graph import matches_any


class QType(str, Enum):
    """Integer types a tensor can be quantized to."""

    INT8 = "int8"
    UINT8 = "uint8"


class Target(str, Enum):
    ORT = "ort"
    TENSORRT = "tensorrt"


class OutputFormat(str, Enum):
    """How the ort target lays out quantized ops (passes/ort_*.py, README "Speed on ONNX Runtime")."""

    QDQ = "qdq"              # Q/DQ on the inputs of quantized ops only: highest fidelity, float kernels in ORT
    QOPERATOR = "qoperator"  # every op with an ORT integer kernel closed into a Q/DQ group ORT lowers to QLinear*
    AUTO = "auto"            # qoperator, except ops whose int8 kernel measured slower than float (qcompiler/kernel_timing.py)


class QuantMode(str, Enum):
    STATIC = "static"    # activation scales calibrated at compile time (needs calibration data)
    DYNAMIC = "dynamic"  # activation scales computed at run time; weights int8 per channel; no data needed


class BiasMode(str, Enum):
    AUTO = "auto"    # int32 for ONNX Runtime (its QLinearConv fusion wants it), float for TensorRT
    INT32 = "int32"
    FLOAT = "float"


QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")
KNOWN_CALIBRATORS = ("minmax", "percentile", "mse", "kl", "entropy")
HISTOGRAM_CALIBRATORS = ("percentile", "mse", "kl", "entropy")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize a model.

    target: "ort" (ONNX Runtime CPU) or "tensorrt" (symmetric int8 everywhere, float bias).
    calibrator: activation range estimator for every tensor ("minmax", "percentile", "mse", "kl").
        "mse" by default: it gave the best SQNR of the four on every model of shared/MODELS.md
        (benchmarks/results/calibration.md), and min-max left the int8 OCR recognizer at 0.4-0.9
        text agreement depending on which few layers stay float, where MSE held 0.8-0.9.
    calibrator_options: keyword options for the calibrator (e.g. {"percentile": 99.99}).
    histogram_values_per_sample: the percentile, MSE and KL calibrators bin at most this many values
        of a tensor per calibration sample (a deterministic strided subset that always includes the
        exact min and max); binning every value of every tensor costs more than running the model.
        None bins everything.
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
        (attention Q.K^T and P.V). None (the default) means off for the ort target, because
        softmax outputs and attention scores lose the most accuracy, and on for tensorrt, whose
        build log shows those MatMuls fused into an INT8 attention kernel (`_gemm_mha_v2`) once
        both inputs carry Q/DQ (float otherwise).
    quantize_input_op_types: op types without weights whose float activation inputs also get
        Q/DQ (e.g. ("Softmax", "LayerNormalization", "Add") for a transformer); empty by default,
        because those ops run in float on ONNX Runtime's CPU and quantizing their inputs only adds
        error. Constant inputs (LayerNorm gamma/beta) are left alone.
    smoothquant: before quantizing, migrate activation outliers into the weights of MatMul/Gemm
        layers (SmoothQuant, Xiao et al. 2023): input channel j of X is divided by s_j and row j of
        W multiplied by s_j, s_j = max|X_j|^alpha / max|W_j|^(1-alpha) (max|W_j| as a fraction of
        the quantization range of each weight column, or of the whole weight when per_channel is
        off), the division folded into the op producing X (passes/smoothquant.py). Exact in float;
        needs calibration data.
    smoothquant_alpha: the migration strength in [0, 1], or "search" to pick, per layer group,
        the grid value (or no smoothing) that minimises that layer's quantized output error on
        sampled calibration rows.
    smoothquant_guard: with a fixed alpha, measure each group's quantized output error on sampled
        calibration rows with and without smoothing, and leave the group unsmoothed (summary:
        "unchanged", with the two errors' ratio) where smoothing at that alpha does not lower it:
        the formula balances maxima and has no error model, so it can make a layer worse (e.g.
        activations without real outlier channels). False applies it to every group.
    smoothquant_unfoldable: what to do where no producer can absorb 1/s (GELU output, graph
        input, a LayerNorm output that also feeds a residual Add): "mul" inserts a Mul by 1/s
        (one elementwise op at run time; listed in the summary), "skip" leaves those layers alone.
    per_token_activations: quantize the activation input of every constant-weight MatMul/Gemm
        dynamically per token (one symmetric int8 scale per row, computed at run time, lowered
        to MatMulInteger) instead of statically per tensor; other quantized inputs stay static.
    calibration_threads: threads while calibrating (0 = one per core): that many samples run side by side
        in ONNX Runtime, one thread each; format "auto" times kernels with that many threads.
    format: for the ort target, "qdq" (today's form: Q/DQ on the inputs of quantized ops; ONNX
        Runtime still runs most of them in float), "qoperator" (op outputs and the activation ops
        between quantized ops are quantized too, so ONNX Runtime runs QLinearConv, QLinearMatMul /
        MatMulIntegerToFloat, QLinearAdd/Mul/Sigmoid/Concat/GlobalAveragePool: faster, a few dB
        lower SQNR) or "auto" (qoperator, but each Conv/MatMul/Gemm whose int8 kernel ONNX Runtime
        runs slower than float plus the conversions around it, by over 10% and 20 us, stays float:
        timed per op on this machine at its real input shape and cached, qcompiler/kernel_timing.py).
        The tensorrt target always gets "qdq".
    mode: "static" (calibrated activation scales, the default) or "dynamic" (ort target only:
        int8 per-channel weights, activations quantized at run time, no calibration data needed;
        lowers MatMul/Gemm with constant weights, leaves Conv in float).
    reduce_range: ort target: 7-bit weights (int8 in [-63, 63]). ONNX Runtime's x86 kernels multiply
        u8 activations by s8 weights; without VNNI (AVX2, AVX-512BW) they use vpmaddubsw, which adds
        two u8 x s8 products into a saturating int16: 2 x 255 x 127 overflows it, 2 x 255 x 63 does
        not. With VNNI (vpdpbusd accumulates in int32) full-range weights are exact and finer.
        None (default): on when the CPU compiling the model has AVX2 but no VNNI (flags avx512_vnni /
        avx_vnni / amx_int8 in /proc/cpuinfo), off otherwise; True/False override that, e.g. when
        the model is deployed on another machine. The tensorrt target never reduces the range.
    debug_checks: run onnx.checker and shape inference after every pass, naming the pass that broke the graph.
    fp8: tensorrt target only: FP8 E4M3 Q/DQ instead of INT8 at the same places (scale = amax / 448;
        the model is upgraded to opset 19; running the engine needs compute capability 8.9+).
    """

    target: Target = Target.ORT
    calibrator: str = "mse"
    calibrator_options: Mapping[str, Any] = field(default_factory=dict)
    histogram_values_per_sample: int | None = 1 << 14
    tensor_calibrators: Mapping[str, str] = field(default_factory=dict)
    activation_type: QType = QType.UINT8
    per_channel: bool = True
    bias: BiasMode = BiasMode.AUTO
    op_types: tuple[str, ...] = QUANTIZABLE_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    exclude_op_types: tuple[str, ...] = ()
    quantize_activation_matmul: bool | None = None
    quantize_input_op_types: tuple[str, ...] = ()
    smoothquant: bool = False
    smoothquant_alpha: float | str = 0.5
    smoothquant_guard: bool = True
    smoothquant_unfoldable: str = "mul"
    per_token_activations: bool = False
    calibration_threads: int = 0
    debug_checks: bool = False
    format: OutputFormat = OutputFormat.QDQ
    mode: QuantMode = QuantMode.STATIC
    reduce_range: bool | None = None
    fp8: bool = False

    def __post_init__(self) -> None:
        for name, enum in (("target", Target), ("activation_type", QType), ("bias", BiasMode),
                           ("format", OutputFormat), ("mode", QuantMode)):
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
        overlap = sorted(set(self.quantize_input_op_types) & set(QUANTIZABLE_OP_TYPES))
        if overlap:
            raise ConfigError(f"quantize_input_op_types lists weighted op types {overlap}; use op_types for those")
        for name in ("op_types", "exclude_nodes", "exclude_op_types", "quantize_input_op_types"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "calibrator_options", dict(self.calibrator_options))
        if self.smoothquant_alpha != "search":
            try:
                alpha = float(self.smoothquant_alpha)
            except (TypeError, ValueError):
                alpha = float("nan")
            if not 0.0 <= alpha <= 1.0:
                raise ConfigError(f"smoothquant_alpha must be a number in [0, 1] or 'search', not {self.smoothquant_alpha!r}")
            object.__setattr__(self, "smoothquant_alpha", alpha)
        if self.per_token_activations and self.target is not Target.ORT:
            raise ConfigError("per_token_activations lowers to MatMulInteger, an ONNX Runtime op; use target='ort'")
        if self.smoothquant_unfoldable not in ("mul", "skip"):
            raise ConfigError(f"smoothquant_unfoldable must be 'mul' or 'skip', not {self.smoothquant_unfoldable!r}")
        if self.histogram_values_per_sample is not None and self.histogram_values_per_sample < 16:
            raise ConfigError("histogram_values_per_sample must be >= 16 or None")
        if self.calibration_threads < 0:
            raise ConfigError("calibration_threads must be >= 0")
        if self.mode is QuantMode.DYNAMIC and self.target is not Target.ORT:
            raise ConfigError("dynamic mode needs ONNX Runtime's integer ops; use target='ort'")
        if self.reduce_range and self.target is not Target.ORT:
            raise ConfigError("reduce_range is for ONNX Runtime's x86 int8 kernels; use target='ort'")
        if self.fp8 and self.target is not Target.TENSORRT:
            raise ConfigError("fp8 is a TensorRT format; use target='tensorrt'")
        if self.quantize_activation_matmul is None:
            object.__setattr__(self, "quantize_activation_matmul", self.target is Target.TENSORRT)
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

    @property
    def resolved_reduce_range(self) -> bool:
        """Whether weights are quantized to 7 bits: the explicit setting, else the CPU's flags."""
        if self.target is not Target.ORT:
            return False
        return cpu_needs_reduced_range() if self.reduce_range is None else bool(self.reduce_range)

    def calibrator_for(self, tensor: str) -> tuple[str, dict[str, Any]]:
        """(calibrator name, options) for one tensor: the first matching override, else the default."""
        name, options = self.calibrator, dict(self.calibrator_options)
        for pattern, override in self.tensor_calibrators.items():
            if matches_any(tensor, (pattern,)):
                name, options = override, {}
                break
        if name in HISTOGRAM_CALIBRATORS:
            options.setdefault("values_per_update", self.histogram_values_per_sample)
        return name, options

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
