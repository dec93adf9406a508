"""Quantizer primitives: error bounds, ranges, groups, clipping, FP8/FP16 outlier formats."""
import pytest
import torch

from atom_lab.primitives import (
    PER_ROW, PER_TENSOR, IntSpec, compute_scales, dequantize, expand_groups, fake_quant,
    fake_quant_static, fp_fake_quant, fp_quantize, group_sizes, quantize,
)


def _rand(shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [PER_TENSOR, PER_ROW, 16])
def test_error_at_most_half_a_step_and_codes_in_range(bits, symmetric, group_size):
    spec = IntSpec(bits=bits, symmetric=symmetric, group_size=group_size)
    x = _rand((8, 64), seed=bits)
    codes, scale, zero = quantize(x, spec)
    assert codes.dtype == spec.code_dtype
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    step = expand_groups(scale.float(), 64, group_size)
    err = (dequantize(codes, scale, zero, spec) - x).abs()
    # symmetric codes never reach qmin = -2^(b-1) for the absmax, so the top is qmax * scale
    assert torch.all(err <= step / 2 + 1e-6)


def test_more_bits_less_error():
    x = _rand((16, 256))
    errs = [(fake_quant(x, IntSpec(bits=b, group_size=32)) - x).pow(2).mean() for b in range(2, 9)]
    assert all(a > 2.5 * b for a, b in zip(errs, errs[1:]))  # about 4x per bit


def test_symmetric_and_asymmetric_ranges():
    sym, asym = IntSpec(bits=4), IntSpec(bits=4, symmetric=False)
    assert (sym.qmin, sym.qmax) == (-8, 7) and (asym.qmin, asym.qmax) == (0, 15)
    x = torch.tensor([[-3.5, 0.0, 1.0, 7.0]])
    scale, zero = compute_scales(x, sym)
    assert zero is None and scale.item() == pytest.approx(1.0)
    scale, zero = compute_scales(x, asym)
    assert scale.item() == pytest.approx(10.5 / 15, rel=1e-3)
    assert zero.item() == round(3.5 / scale.item())
    assert scale.dtype == torch.float16 and zero.dtype == torch.float16


def test_asymmetric_group_of_one_sign_is_representable():
    # regression: an all-positive group used to clamp its zero point and saturate at xmax - xmin
    x = torch.tensor([[1.0, 2.0, 3.0, 2.5]])
    spec = IntSpec(bits=4, symmetric=False)
    codes, scale, zero = quantize(x, spec)
    assert 0 <= zero.item() <= 15 and zero.item() == int(zero.item())
    assert (dequantize(codes, scale, zero, spec) - x).abs().max() <= scale.float().item() / 2 + 1e-6


def test_partial_last_group():
    assert group_sizes(576 - 128, 128) == [128, 128, 128, 64]
    assert group_sizes(100, 0) == [100] and group_sizes(100, 200) == [100]
    x = _rand((3, 40))
    spec = IntSpec(bits=4, group_size=16)
    codes, scale, _ = quantize(x, spec)
    assert scale.shape == (3, 3)
    tail_absmax = x[:, 32:].abs().amax(dim=-1)
    assert torch.allclose(scale[:, 2].float(), (tail_absmax / 7).half().float())
    # the tail group is quantized on its own: same codes as quantizing it alone
    alone, _, _ = quantize(x[:, 32:], IntSpec(bits=4, group_size=PER_ROW))
    assert torch.equal(codes[:, 32:], alone)


def test_clip_saturates_and_shrinks_scale():
    x = _rand((4, 128))
    full, clipped = IntSpec(bits=4), IntSpec(bits=4, clip=0.5)
    s_full, _ = compute_scales(x, full)
    s_clip, _ = compute_scales(x, clipped)
    assert torch.allclose(s_clip.float(), (x.abs().amax(-1, keepdim=True) * 0.5 / 7).half().float())
    y = fake_quant(x, clipped)
    step = s_clip.float()
    assert torch.all(y <= 7 * step + 1e-6) and torch.all(y >= -8 * step - 1e-6)
    assert (y == 7 * step).any()  # the clipped absmax saturates
    # clipping trades the outliers' error for finer steps on small values
    small = x.abs() < 0.3 * x.abs().amax(-1, keepdim=True)
    assert (y - x)[small].pow(2).mean() < (fake_quant(x, full) - x)[small].pow(2).mean()


def test_scales_rounded_to_fp16_before_codes():
    x = _rand((4, 64)) * 3.3
    spec = IntSpec(bits=4, group_size=16)
    codes, scale, _ = quantize(x, spec)
    expected = torch.round(x / expand_groups(scale.float(), 64, 16)).clamp(-8, 7)
    assert torch.equal(codes.float(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fake_quant_keeps_dtype(dtype):
    x = _rand((4, 32), dtype=dtype)
    y = fake_quant(x, IntSpec(bits=8, group_size=8))
    assert y.dtype == dtype
    assert (y.float() - x.float()).abs().max() < 0.05


def test_static_scales_saturate_outside_calibrated_range():
    spec = IntSpec(bits=8, group_size=PER_TENSOR)
    scale = torch.tensor([[1.0 / 127]], dtype=torch.float16)
    x = torch.tensor([[0.5, -0.25, 3.0, -2.0]])
    y = fake_quant_static(x, scale, None, spec)
    assert torch.allclose(y[0, :2], x[0, :2], atol=scale.float().item())
    assert y[0, 2].item() == pytest.approx(127 * scale.float().item())
    assert y[0, 3].item() == pytest.approx(-128 * scale.float().item())


@pytest.mark.parametrize("fmt,rel", [("fp8_e4m3", 2 ** -4), ("fp8_e5m2", 2 ** -3)])
def test_fp8_relative_error(fmt, rel):
    x = _rand((8, 64)) * 50
    codes, scale = fp_quantize(x, fmt)
    assert scale.shape == (8, 1)
    y = fp_fake_quant(x, fmt)
    assert not torch.isnan(y).any()
    # normal fp8 numbers carry 3 (e4m3) or 2 (e5m2) mantissa bits: half-ulp relative error
    big = x.abs() > x.abs().amax(-1, keepdim=True) * 2 ** -5
    assert torch.all(((y - x).abs() / x.abs())[big] <= rel + 1e-6)
    assert torch.allclose(y.abs().amax(-1), x.abs().amax(-1), rtol=1e-6)


def test_fp16_outliers_exact_for_fp16_values():
    x = _rand((4, 16)).half().float()
    assert torch.equal(fp_fake_quant(x, "fp16"), x)
    with pytest.raises(ValueError, match="fp4"):
        fp_quantize(x, "fp4")


@pytest.mark.parametrize("kwargs", [dict(bits=1), dict(bits=9), dict(bits=4, clip=0.0),
                                    dict(bits=4, clip=1.5), dict(bits=4, group_size=-2)])
def test_intspec_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        IntSpec(**kwargs)
