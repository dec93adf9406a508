"""The structured configuration of a quantization experiment, validated before any model loads.

Every Atom technique is one plain key of `QuantConfig`, so Hydra sweeps such as
`python run.py quant.group_size=64 -m` address it directly. `validate()` checks the keys alone;
`validate_for_model()` checks them against a model's dimensions (hidden, FFN, head_dim).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

NO_QUANT_BITS = 16
OUTLIER_FORMATS = ("int8", "fp8_e4m3", "fp8_e5m2", "fp16")
REORDER_METRICS = ("hessian", "abs_mean", "abs_max")
WEIGHT_METHODS = ("rtn", "gptq")
STATIC_GRANULARITIES = ("tensor", "channel")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, value and allowed values."""


def _bad(key: str, value, allowed: str) -> ConfigError:
    return ConfigError(f"quant.{key}={value!r} is not allowed: {allowed}")


@dataclass
class QuantConfig:
    """Quantizer components. Bits of 16 switch a component off (FP16/BF16/FP32 as loaded)."""

    name: str = "custom"
    w_bits: int = NO_QUANT_BITS
    a_bits: int = NO_QUANT_BITS
    kv_bits: int = NO_QUANT_BITS
    group_size: int = 0  # 0: per output channel (weights) / per token (activations)
    outliers: int = 0  # channels per linear input kept at outlier precision (the last ones)
    outlier_bits: str = "int8"  # int8 | fp8_e4m3 | fp8_e5m2 | fp16
    reorder: bool = True  # reorder channels by reorder_metric (needed for outliers > 0)
    reorder_metric: str = "hessian"  # hessian (sum x^2) | abs_mean | abs_max
    dynamic: bool = True  # per-token dynamic activation scales; False: static from calibration
    static_granularity: str = "tensor"  # tensor | channel (static scales only)
    a_clip: float = 1.0
    w_clip: float = 1.0
    kv_clip: float = 1.0
    w_sym: bool = True
    weight_method: str = "rtn"  # rtn | gptq
    percdamp: float = 0.01
    gptq_block: int = 128
    act_order: bool = False
    w_channel_group: int = 1  # output rows sharing one weight scale (Atom: 2)
    kv_group_size: int = 0  # 0: one group per head (group = head_dim)
    k_before_rope: bool = True  # Atom quantizes K before RoPE in its fake-quant
    quantize_lm_head: bool = False

    @property
    def quantizes_weights(self) -> bool:
        return self.w_bits < NO_QUANT_BITS

    @property
    def quantizes_activations(self) -> bool:
        return self.a_bits < NO_QUANT_BITS

    @property
    def quantizes_kv(self) -> bool:
        return self.kv_bits < NO_QUANT_BITS

    @property
    def needs_calibration(self) -> bool:
        reorders = self.reorder and self.outliers > 0
        static = self.quantizes_activations and not self.dynamic
        return reorders or static or self.weight_method == "gptq" and self.quantizes_weights

    @classmethod
    def from_dict(cls, d) -> "QuantConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown quant key(s) {unknown}; allowed keys: {sorted(known)}")
        cfg = cls(**{k: _typed(cls, k, v) for k, v in dict(d).items()})
        cfg.outlier_bits = normalize_outlier_bits(cfg.outlier_bits)
        cfg.validate()
        return cfg

    @classmethod
    def coerce(cls, qcfg) -> "QuantConfig":
        """A validated QuantConfig from a QuantConfig or any mapping (dict, DictConfig)."""
        if isinstance(qcfg, cls):
            return qcfg.validate()
        if hasattr(qcfg, "items"):
            return cls.from_dict(dict(qcfg.items()))
        raise ConfigError(f"quant config of type {type(qcfg).__name__}: expected QuantConfig or "
                          f"mapping")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "QuantConfig":
        for key in ("w_bits", "a_bits", "kv_bits"):
            bits = getattr(self, key)
            if not (2 <= bits <= 8 or bits == NO_QUANT_BITS):
                raise _bad(key, bits, "2..8 bits, or 16 for no quantization")
        if self.group_size < 0:
            raise _bad("group_size", self.group_size, "0 (per channel / per token) or G > 0")
        if self.outliers < 0:
            raise _bad("outliers", self.outliers, "a channel count >= 0")
        self.outlier_bits = normalize_outlier_bits(self.outlier_bits)
        for key, allowed in (("reorder_metric", REORDER_METRICS), ("weight_method", WEIGHT_METHODS),
                             ("static_granularity", STATIC_GRANULARITIES)):
            if getattr(self, key) not in allowed:
                raise _bad(key, getattr(self, key), f"one of {list(allowed)}")
        for key in ("a_clip", "w_clip", "kv_clip"):
            value = getattr(self, key)
            if not 0.0 < value <= 1.0:
                raise _bad(key, value, "a clip ratio in (0, 1]")
        if not 0.0 <= self.percdamp < 1.0:
            raise _bad("percdamp", self.percdamp, "a damping fraction in [0, 1)")
        if self.gptq_block <= 0:
            raise _bad("gptq_block", self.gptq_block, "a positive column block size")
        if self.w_channel_group not in (1, 2, 4):
            raise _bad("w_channel_group", self.w_channel_group, "1, 2 or 4 output rows per scale")
        if self.kv_group_size < 0:
            raise _bad("kv_group_size", self.kv_group_size, "0 (head_dim) or G > 0 dividing head_dim")
        if self.outliers > 0 and not self.reorder:
            raise _bad("reorder", self.reorder, "true when quant.outliers > 0 (outliers are the "
                       "top channels of the reorder metric)")
        return self

    def validate_for_model(self, hidden: int, intermediate: int, head_dim: int) -> "QuantConfig":
        """Checks that need the model's dimensions; called before any weight is touched."""
        if self.kv_group_size > 0 and head_dim % self.kv_group_size:
            raise _bad("kv_group_size", self.kv_group_size, f"a divisor of head_dim={head_dim}")
        if not (self.quantizes_weights or self.quantizes_activations):
            return self  # outliers and groups only shape the linears' quantizers
        smallest = min(hidden, intermediate)
        if self.outliers >= smallest:
            raise _bad("outliers", self.outliers,
                       f"fewer than the smallest linear input ({smallest} channels: hidden "
                       f"{hidden}, FFN {intermediate})")
        for k in sorted({hidden, intermediate}):
            if (k - self.outliers) % 2:
                raise _bad("outliers", self.outliers,
                           f"a count leaving an even number of normal channels ({k} - outliers)")
        if self.group_size > 0 and self.group_size > smallest - self.outliers:
            raise _bad("group_size", self.group_size,
                       f"at most {smallest - self.outliers} (the normal channels of the smallest "
                       f"linear input), or 0 for per-channel")
        return self


def _typed(cls, key: str, value):
    """A value of the field's declared type (int, float or bool), else a ConfigError naming it."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    kind = kind if isinstance(kind, str) else getattr(kind, "__name__", "")
    if value is None or kind not in ("int", "float", "bool"):
        return value
    if kind == "bool":
        if isinstance(value, bool):
            return value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind == "float" or float(value).is_integer():
            return type(1 if kind == "int" else 1.0)(value)
    raise ConfigError(f"quant.{key}={value!r} is not allowed: expected {kind}")


def normalize_outlier_bits(value) -> str:
    """Accept 8 / 16 / 'int8' / 'fp16' / 'fp8_e4m3' / 'fp8_e5m2' -> canonical name."""
    aliases = {8: "int8", "8": "int8", 16: "fp16", "16": "fp16", "fp8": "fp8_e4m3"}
    value = aliases.get(value, value)
    if value not in OUTLIER_FORMATS:
        raise _bad("outlier_bits", value, f"one of {list(OUTLIER_FORMATS)} (or 8 / 16)")
    return value


@dataclass
class CalibConfig:
    dataset: str = "wikitext2"
    split: str = "validation"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    cache_dir: str | None = None  # None: ~/.cache/atom_lab/calib

    def validate(self) -> "CalibConfig":
        if self.nsamples <= 0:
            raise ConfigError(f"calib.nsamples={self.nsamples} is not allowed: a positive count")
        if self.seqlen <= 0:
            raise ConfigError(f"calib.seqlen={self.seqlen} is not allowed: a positive token count")
        return self


@dataclass
class ExperimentConfig:
    quant: QuantConfig = field(default_factory=QuantConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
