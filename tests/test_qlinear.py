"""ActQuantizer / QuantLinear / RTN weights against the packed-format reference."""
import pytest
import torch
from torch import nn

from atom_lab.formats import decode_mixed, encode_mixed, mixed_gemm_reference
from atom_lab.qlinear import ActQuantizer, QuantLinear
from atom_lab.weights import WeightSpec, rtn_quantize_weight


def _rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _activations(tokens=12, k=576, outliers=128, seed=0):
    x = _rand((tokens, k), seed)
    x[:, k - outliers:] *= 10  # outliers are the last channels after reordering
    return x


@pytest.mark.parametrize("K,k,group,clip", [(576, 128, 128, 0.9), (1536, 128, 128, 1.0),
                                             (256, 0, 64, 0.9), (256, 32, 0, 1.0)])
def test_act_quantizer_equals_format_reference(K, k, group, clip):
    # SmolLM2 hidden 576 with 128 outliers: 448 normal channels = 3 groups of 128 + one of 64
    x = _activations(k=K, outliers=k)
    quant = ActQuantizer(bits=4, group_size=group, clip=clip, outliers=k)
    ref = decode_mixed(encode_mixed(x, k, bits=4, group_size=group, clip=clip))
    assert torch.equal(quant(x), ref)
    assert torch.equal(quant(x.reshape(3, 4, K)), ref.reshape(3, 4, K))  # [batch, seq, K]


def test_quant_linear_equals_mixed_gemm_reference():
    K, k, G = 576, 128, 128
    x, w = _activations(k=K, outliers=k), _rand((96, K), 1)
    spec = WeightSpec(bits=4, group_size=G, outliers=k)
    w_hat, packed = rtn_quantize_weight(w, spec)
    layer = QuantLinear(w, None, ActQuantizer(bits=4, group_size=G, outliers=k))
    layer.set_weight(w_hat, packed)
    ref = mixed_gemm_reference(encode_mixed(x, k, 4, G), packed, torch.float64)
    assert torch.allclose(layer(x).double(), ref, rtol=1e-5, atol=1e-4)
    # without channel sharing the packed weight is exactly formats.encode_mixed of the weight
    expect = encode_mixed(w, k, 4, G)
    for field in ("normal", "normal_scales", "outlier", "outlier_scales"):
        assert torch.equal(getattr(packed, field), getattr(expect, field))
    assert torch.equal(decode_mixed(packed), w_hat)


def test_rtn_channel_group_shares_scale_over_row_pairs():
    w = _rand((8, 128))
    spec = WeightSpec(bits=4, group_size=32, channel_group=2, clip=0.85)
    w_hat, packed = rtn_quantize_weight(w, spec)
    s = packed.normal_scales.float()
    assert torch.equal(s[0::2], s[1::2])
    pair_absmax = w.reshape(4, 2, 4, 32).abs().amax(dim=(1, 3))
    assert torch.allclose(s[0::2], (pair_absmax * 0.85 / 7).half().float())
    assert torch.equal(decode_mixed(packed), w_hat)


@pytest.mark.parametrize("outlier_bits,tol", [("fp16", 1e-3), ("fp8_e4m3", 0.07), ("fp8_e5m2", 0.13)])
def test_float_outlier_blocks(outlier_bits, tol):
    x = _activations(k=256, outliers=32)
    quant = ActQuantizer(bits=4, group_size=64, outliers=32, outlier_bits=outlier_bits)
    y = quant(x)
    rel = (y[:, -32:] - x[:, -32:]).abs() / x[:, -32:].abs().clamp_min(1.0)
    assert rel.max() < tol
    assert torch.equal(y[:, :-32], decode_mixed(encode_mixed(x[:, :-32], 0, 4, 64)))
    w_hat, packed = rtn_quantize_weight(_rand((16, 256)), WeightSpec(4, 64, outliers=32,
                                                                     outlier_bits=outlier_bits))
    assert packed is None  # the packed format holds INT8 outliers only


def test_static_differs_from_dynamic_and_uses_calibrated_scales():
    calib = _activations(tokens=64, k=256, outliers=32, seed=1)
    abs_max = calib.abs().amax(dim=0)
    x = _activations(k=256, outliers=32, seed=2) * 0.5  # quieter than calibration
    dynamic = ActQuantizer(bits=4, group_size=64, outliers=32, clip=0.9)
    for granularity in ("tensor", "channel"):
        static = ActQuantizer(bits=4, group_size=64, outliers=32, clip=0.9, dynamic=False,
                              static_granularity=granularity)
        with pytest.raises(RuntimeError, match="calibrate"):
            static(x)
        static.calibrate(abs_max)
        y = static(x)
        assert not torch.equal(y, dynamic(x))
        peak = abs_max[:224] if granularity == "channel" else abs_max[:224].max()
        step = (peak * 0.9 / 7).half().float()
        assert torch.allclose(static.normal_scale.float(), step.reshape(-1))
        assert torch.allclose(y[:, :224], (x[:, :224] / step).round().clamp(-8, 7) * step)
        assert torch.allclose(static.outlier_scale.float().reshape(-1),
                              (abs_max[224:] if granularity == "channel"
                               else abs_max[224:].max()).div(127).half().float().reshape(-1))
    # on quieter inputs the per-token dynamic scales fit better
    err = lambda q: (q(x) - x).pow(2).mean()
    assert err(dynamic) < err(static)


def test_shared_quantizer_runs_once_per_input():
    quant = ActQuantizer(bits=4, group_size=16)
    calls = []
    original = quant.quantize
    quant.quantize = lambda x: calls.append(1) or original(x)
    layers = [QuantLinear(_rand((8, 64), i), None, quant) for i in range(3)]  # q, k, v
    assert quant.consumers == 3
    x = _rand((5, 64))
    outs = [layer(x) for layer in layers]
    assert len(calls) == 1 and quant._cache is None  # released after the last consumer
    for layer, out in zip(layers, outs):
        assert torch.equal(out, nn.functional.linear(quant.quantize(x), layer.weight))
    x2 = x.clone()
    layers[0](x2), layers[1](x2 * 2)  # a different input is quantized again
    assert len(calls) == 1 + 3 + 2  # (+3 for the reference calls above)


def test_shared_quantizer_works_under_inference_mode():
    """Inference tensors carry no version counter; the shared-input cache must not need one."""
    quant = ActQuantizer(bits=4, group_size=16)
    layers = [QuantLinear(_rand((8, 64), i), None, quant) for i in range(2)]  # gate, up
    with torch.inference_mode():
        x = _rand((5, 64)).clone()
        outs = [layer(x) for layer in layers]
    for layer, out in zip(layers, outs):
        assert torch.equal(out, nn.functional.linear(quant.quantize(x), layer.weight))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quant_linear_dtypes(dtype):
    lin = nn.Linear(64, 32).to(dtype)
    layer = QuantLinear.from_linear(lin, ActQuantizer(bits=8, group_size=32))
    w_hat, packed = rtn_quantize_weight(lin.weight, WeightSpec(bits=8, group_size=32))
    layer.set_weight(w_hat, packed)
    x = _rand((4, 64)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and layer.weight.dtype == dtype and packed is None
    ref = lin(x).float()
    assert ((y.float() - ref).norm() / ref.norm()) < 0.03


def test_activation_settings_exposed_for_kernels():
    quant = ActQuantizer(bits=4, group_size=128, clip=0.9, outliers=128)
    assert (quant.bits, quant.group_size, quant.clip, quant.outliers, quant.dynamic) == \
        (4, 128, 0.9, 128, True)
    with pytest.raises(ValueError, match="outlier_bits='int4'"):
        ActQuantizer(bits=4, outlier_bits="int4")
    with pytest.raises(ValueError, match="static_granularity='group'"):
        ActQuantizer(bits=4, static_granularity="group")
