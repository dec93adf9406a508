"""Fake-quantized linear layers: an activation quantizer in front of a fixed quantized weight.

Inputs arrive already reordered (see reorder.py), so the `outliers` outlier channels are the LAST
k channels of every linear input. The K - k normal channels are quantized symmetrically at `bits`
in groups of `group_size` (0: one group per token); when G does not divide K - k the last group is
shorter (e.g. SmolLM2: 576 - 128 = 448 = 3 x 128 + 64), exactly as formats.MixedQuantized stores
it. The outlier block is one group per token at `outlier_bits` (int8, fp8_e4m3, fp8_e5m2, fp16).

Dynamic scales are computed per token (per group) at run time, as Atom does. Static scales are
fixed from calibration: range = a_clip * abs_max of the calibration activations, per tensor or
per input channel (`static_granularity`); group_size does not apply to static scales.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from atom_lab.config import NO_QUANT_BITS, OUTLIER_FORMATS, STATIC_GRANULARITIES
from atom_lab.formats import MixedQuantized, normal_spec, outlier_spec
from atom_lab.primitives import MIN_SCALE, IntSpec, fake_quant, fp_fake_quant



def _static_fake_quant(x: torch.Tensor, scale: torch.Tensor, spec: IntSpec) -> torch.Tensor:
    """Symmetric fake-quant with a fixed scale broadcast over the last dim (1 or K values)."""
    s = scale.float()
    return (torch.round(x.float() / s).clamp(spec.qmin, spec.qmax) * s).to(x.dtype)


def static_scale(abs_max: torch.Tensor, qmax: float, clip: float, granularity: str) -> torch.Tensor:
    """Calibrated symmetric scale(s): clip * abs_max / qmax, one value or one per channel, fp16."""
    peak = abs_max.float() if granularity == "channel" else abs_max.float().amax().reshape(1)
    return (peak * clip / qmax).clamp_min(MIN_SCALE).to(torch.float16)


class ActQuantizer(nn.Module):
    """Fake-quantizes a linear input [..., K] whose last `outliers` channels are the outliers.

    bits=16 leaves the normal channels in floating point. Shared by the linears that read the same
    input (q/k/v, gate/up): the result of the last call is reused while the same tensor comes back,
    so the input is quantized once per forward.
    """

    def __init__(self, bits: int, group_size: int = 0, clip: float = 1.0, outliers: int = 0,
                 outlier_bits: str = "int8", dynamic: bool = True,
                 static_granularity: str = "tensor"):
        super().__init__()
        if outlier_bits not in OUTLIER_FORMATS:
            raise ValueError(f"outlier_bits={outlier_bits!r}: allowed {list(OUTLIER_FORMATS)}")
        if static_granularity not in STATIC_GRANULARITIES:
            raise ValueError(f"static_granularity={static_granularity!r}: allowed "
                             f"{list(STATIC_GRANULARITIES)}")
        if outliers < 0:
            raise ValueError(f"outliers={outliers}: a channel count >= 0")
        self.bits, self.group_size, self.clip = bits, group_size, clip
        self.outliers, self.outlier_bits = outliers, outlier_bits
        self.dynamic, self.static_granularity = dynamic, static_granularity
        self.spec = normal_spec(bits, group_size, clip) if bits < NO_QUANT_BITS else None
        self.register_buffer("normal_scale", None)
        self.register_buffer("outlier_scale", None)
        self.consumers = 0  # QuantLinears reading this quantizer's output
        self._cache = None  # (input, its version, output, uses left)

    def extra_repr(self) -> str:
        mode = "dynamic" if self.dynamic else f"static/{self.static_granularity}"
        return (f"bits={self.bits}, group_size={self.group_size}, clip={self.clip}, "
                f"outliers={self.outliers} ({self.outlier_bits}), {mode}")

    def calibrate(self, abs_max: torch.Tensor) -> None:
        """Fix static scales from the calibration abs_max per input channel (reordered order)."""
        self._cache = None
        k = self.outliers
        kn = abs_max.numel() - k
        if self.spec is not None:
            self.normal_scale = static_scale(abs_max[:kn], self.spec.qmax, self.clip,
                                             self.static_granularity)
        if k and self.outlier_bits == "int8":
            self.outlier_scale = static_scale(abs_max[kn:], outlier_spec().qmax, 1.0,
                                              self.static_granularity)

    def _quantize_normal(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return x
        if self.dynamic:
            return fake_quant(x, self.spec)
        if self.normal_scale is None:
            raise RuntimeError("static ActQuantizer used before calibrate(abs_max) set its scales")
        return _static_fake_quant(x, self.normal_scale, self.spec)

    def _quantize_outliers(self, x: torch.Tensor) -> torch.Tensor:
        if self.outlier_bits != "int8":
            return fp_fake_quant(x, self.outlier_bits)  # per-token scale (fp8) or none (fp16)
        if self.dynamic:
            return fake_quant(x, outlier_spec())
        return _static_fake_quant(x, self.outlier_scale, outlier_spec())

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        kn = x.shape[-1] - self.outliers
        if kn < 0:
            raise ValueError(f"input of {x.shape[-1]} channels has fewer than outliers={self.outliers}")
        if self.outliers == 0:
            return self._quantize_normal(x)
        return torch.cat([self._quantize_normal(x[..., :kn]),
                          self._quantize_outliers(x[..., kn:])], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cache = self._cache
        version = None if x.is_inference() else x._version  # inference tensors have no counter
        if cache is not None and cache[0] is x and cache[1] == version:
            uses_left = cache[3] - 1
            self._cache = (x, version, cache[2], uses_left) if uses_left > 0 else None
            return cache[2]
        y = self.quantize(x)
        self._cache = (x, version, y, self.consumers - 1) if self.consumers > 1 else None
        return y


class QuantLinear(nn.Module):
    """y = act_quantizer(x) @ weight^T + bias, with a fixed (already fake-quantized) weight.

    `weight` holds the dequantized weight in the layer's dtype. `packed_weight` holds the same
    weight as formats.MixedQuantized codes when that format can represent it (for the kernels).
    `input_observer`, if set, is called with the (quantized) input the GEMM sees (GPTQ Hessians).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 act_quantizer: ActQuantizer | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.act_quantizer = act_quantizer
        if act_quantizer is not None:
            act_quantizer.consumers += 1
        self.packed_weight: MixedQuantized | None = None
        self.input_observer: Callable[[torch.Tensor], None] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_quantizer: ActQuantizer | None = None):
        return cls(linear.weight, linear.bias, act_quantizer)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={self.packed_weight is not None}")

    def set_weight(self, w_hat: torch.Tensor, packed: MixedQuantized | None = None) -> None:
        """Install a quantized weight (any float dtype; stored in the layer's dtype)."""
        if tuple(w_hat.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight of shape {tuple(w_hat.shape)} for a layer of "
                             f"{(self.out_features, self.in_features)}")
        self.weight.data = w_hat.to(device=self.weight.device, dtype=self.weight.dtype)
        self.packed_weight = _move_packed(packed, self.weight.device)

    def _apply(self, fn, *args, **kwargs):
        # packed codes/scales keep their dtypes; they only follow the layer's device
        module = super()._apply(fn, *args, **kwargs)
        self.packed_weight = _move_packed(self.packed_weight, self.weight.device)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        if self.input_observer is not None:
            self.input_observer(x)
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)


def _move_packed(packed: MixedQuantized | None, device) -> MixedQuantized | None:
    if packed is None or packed.normal.device == torch.device(device):
        return packed
    return MixedQuantized(packed.normal.to(device), packed.normal_scales.to(device),
                          packed.outlier.to(device), packed.outlier_scales.to(device),
                          packed.bits, packed.group_size)
