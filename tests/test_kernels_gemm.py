"""W4A4 kernels: activation quantize (plain / RMSNorm / SiLU*up, gather fused) and the GEMM.

GPU tests compare each kernel with the CPU reference of the packed format on fresh random inputs
and poisoned outputs; they skip without CuPy and a CUDA GPU. The shape checks run anywhere.
"""
from __future__ import annotations

import re

import pytest
import torch

from atom_lab import kernel_ops as ko
from atom_lab.cuda import KernelBackendUnavailable, kernel_backend_available
from atom_lab.formats import MixedQuantized, decode_mixed, encode_mixed

gpu = pytest.mark.skipif(not kernel_backend_available(), reason="needs CuPy and a CUDA GPU")


def _acts(m: int, k_total: int, device: str = "cuda") -> torch.Tensor:
    x = torch.randn(m, k_total, device=device)
    x[:, torch.randperm(k_total)[: k_total // 64]] *= 20  # a few outlier channels
    return x.half()


def _poisoned(m, kn, k, group, bits, byte) -> MixedQuantized:
    signed = byte - 256 if byte > 127 else byte
    nan = float("nan")
    return MixedQuantized(torch.full((m, kn // 2), byte, dtype=torch.uint8, device="cuda"),
                          torch.full((m, kn // group), nan, dtype=torch.float16, device="cuda"),
                          torch.full((m, k), signed, dtype=torch.int8, device="cuda"),
                          torch.full((m, 1), nan, dtype=torch.float16, device="cuda"), bits, group)


# ------------------------------------------------------------------------ CPU: shapes and errors


@pytest.mark.parametrize("k_total,k,group,bits,needle", [
    (4096, 128, 32, 4, "group_size=32"),
    (4096, 128, 0, 4, "group_size=0"),
    (4096, 20, 128, 4, "outliers=20"),
    (4096, 512, 128, 4, "outliers=512"),
    (576, 128, 128, 4, "K-k=448"),  # SmolLM2-135M: not a multiple of the group
    (4096, 128, 128, 8, "bits=8"),
    (1092, 4, 64, 4, "outliers=4"),
])
def test_layout_check_names_the_offending_numbers(k_total, k, group, bits, needle):
    with pytest.raises(ko.KernelShapeError, match=re.escape(needle)):
        ko.check_mixed_layout(k_total, k, group, bits)


def test_layout_check_accepts_llama_shapes():
    for k_total in (4096, 5120, 11008, 13824, 14336):
        for k in (0, 128, 256):
            for group in (64, 128):
                ko.check_mixed_layout(k_total, k, group, 4)


def test_gemm_operand_check_rejects_mismatched_operands():
    a = encode_mixed(torch.randn(3, 1152).half(), 128, 4, 128)
    w64 = encode_mixed(torch.randn(8, 1152).half(), 128, 4, 64)
    with pytest.raises(ko.KernelShapeError, match="disagree"):
        ko.check_gemm_operands(a, w64)
    w_odd = encode_mixed(torch.randn(7, 1152).half(), 128, 4, 128)
    with pytest.raises(ko.KernelShapeError, match="N=7"):
        ko.check_gemm_operands(a, w_odd)
    w = encode_mixed(torch.randn(8, 1152).half(), 128, 4, 128)
    assert ko.check_gemm_operands(a, w) == (3, 8, 1024, 128)


def test_fp16_quotients_need_one_residual_step():
    """The ring quantize kernels divide with RN(1/s), q = x*r and ONE exact-residual correction; this
    equals IEEE x / s for every pair of fp16 significands (x, s both fp16) over the quotient range
    the codes use. A plain x * RN(1/s) does not: it flips rint at exact halves (e.g. 7.5 / 3)."""
    sig = torch.arange(1024, 2048, dtype=torch.float64)
    b = sig[None, :].float()
    r = 1.0 / b
    bad_plain = 0
    for shift in range(-14, 9):
        a = (sig[:, None] * 2.0**shift).float()
        exact = a / b
        q0 = a * r
        res = (a.double() - b.double() * q0.double()).float()  # FMA: exact residual, one rounding
        q1 = (q0.double() + res.double() * r.double()).float()
        assert torch.equal(q1, exact), f"one-step quotient differs at 2^{shift}"
        bad_plain += int((torch.round(q0) != torch.round(exact)).sum())
    assert bad_plain > 0


def test_dispatch_covers_every_m():
    for m in range(1, 8193):
        assert ko.choose_gemm_variant(m) in ko.GEMM_VARIANTS
        assert ko.choose_quant_variant(m) in ko.QUANT_VARIANTS


def test_quantize_refuses_an_unknown_variant():
    with pytest.raises(ValueError, match="variant='warp'"):
        ko.quantize_mixed(torch.randn(2, 1024).half(), 128, variant="warp")


@pytest.mark.skipif(kernel_backend_available(), reason="checks the no-GPU error")
def test_kernels_refuse_cleanly_without_a_gpu():
    with pytest.raises(KernelBackendUnavailable):
        ko.quantize_mixed(torch.randn(2, 1024).half(), 128)


def test_fp16_producer_references_round_like_an_fp16_model():
    x, w = torch.randn(4, 256).half(), (torch.rand(256) + 0.5).half()
    y = ko.rmsnorm_fp16_reference(x, w, 1e-6)
    ref = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()
    assert y.dtype == torch.float16
    assert torch.allclose(y.float(), ref, rtol=2e-3, atol=1e-3)
    g, u = torch.randn(4, 256).half(), torch.randn(4, 256).half()
    s = ko.silu_mul_fp16_reference(g, u)
    assert torch.allclose(s.float(), torch.nn.functional.silu(g.float()) * u.float(), rtol=2e-3,
                          atol=1e-3)


# --------------------------------------------------------------------------------- GPU: kernels


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(ko.QUANT_VARIANTS))
@pytest.mark.parametrize("m,k_total,k,group,bits,clip,gather", [
    (1, 1024, 128, 128, 4, 0.9, True),
    (37, 4096, 128, 128, 4, 0.9, True),
    (16, 1152, 0, 64, 4, 1.0, True),
    (5, 2304, 256, 128, 4, 0.85, False),
    (9, 1104, 16, 64, 3, 0.9, True),
    (700, 2176, 128, 128, 4, 0.9, True),  # more rows than one-block-a-SM grids: rows a block > 1
])
def test_quantize_kernel_is_bit_exact(variant, m, k_total, k, group, bits, clip, gather):
    x = _acts(m, k_total)
    idx = torch.randperm(k_total, device="cuda") if gather else None
    ref_in = x.cpu()[:, idx.cpu()] if gather else x.cpu()
    ref = encode_mixed(ref_in, k, bits, group, clip)
    for byte in (0x00, 0xFF):  # two poisons: an unwritten byte cannot match both
        out = _poisoned(m, k_total - k, k, group, bits, byte)
        ko.quantize_mixed(x, k, bits, group, clip, idx, out=out, variant=variant)
        agree = ko.mixed_agreement(out, ref)
        assert all(v == 1.0 for key, v in agree.items() if key.endswith("equal")), agree


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["row", "ring", "ring_b1"])
@pytest.mark.parametrize("kind", ["rmsnorm", "silu_mul"])
@pytest.mark.parametrize("group", [64, 128])
def test_fused_quantize_kernels_match_the_fp16_producer(kind, group, variant):
    # The fused producer computes in fp32 and rounds to fp16 like PyTorch, but its sum of squares
    # (RMSNorm) or exp (SiLU) may differ from the CPU in the last fp32 bit; a value on an fp16
    # rounding boundary then moves by one fp16 ulp, which can move one code by 1 (or a scale).
    m, k_total, k = 333, 4096, 128  # > 132 rows: ring_b1 blocks take several rows
    x, up = _acts(m, k_total), _acts(m, k_total)
    norm_w = (torch.rand(k_total, device="cuda") + 0.5).half()
    idx = torch.randperm(k_total, device="cuda")
    if kind == "rmsnorm":
        ref_in = ko.rmsnorm_fp16_reference(x.cpu(), norm_w.cpu(), 1e-5)
    else:
        ref_in = ko.silu_mul_fp16_reference(x.cpu(), up.cpu())
    ref = encode_mixed(ref_in[:, idx.cpu()], k, 4, group, 0.9)
    out = _poisoned(m, k_total - k, k, group, 4, 0xFF)
    if kind == "rmsnorm":
        ko.rmsnorm_quantize_mixed(x, norm_w, 1e-5, k, 4, group, 0.9, idx, out=out, variant=variant)
    else:
        ko.silu_mul_quantize_mixed(x, up, k, 4, group, 0.9, idx, out=out, variant=variant)
    agree = ko.mixed_agreement(out, ref)
    assert agree["codes_equal"] >= 0.999 and agree["outliers_equal"] >= 0.999, agree
    assert agree["scales_equal"] >= 0.99 and agree["max_code_diff"] <= 1, agree
    assert torch.isfinite(out.normal_scales).all() and torch.isfinite(out.outlier_scales).all()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(ko.GEMM_VARIANTS))
@pytest.mark.parametrize("m,n,k_total,k,group,with_bias", [
    (1, 256, 1024, 128, 128, False),
    (7, 384, 1152, 128, 64, True),
    (33, 512, 2048, 0, 128, False),
    (130, 250, 1104, 16, 64, True),
    (257, 640, 1056, 32, 128, False),
])
def test_gemm_matches_the_format_reference(variant, m, n, k_total, k, group, with_bias):
    a = encode_mixed(_acts(m, k_total), k, 4, group, 0.9)
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, group, 0.85)
    bias = torch.randn(n, device="cuda").half() if with_bias else None
    ref = decode_mixed(a, torch.float64) @ decode_mixed(w, torch.float64).T
    if bias is not None:
        ref += bias.double()
    y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
    ko.mixed_gemm(a, w, bias, variant=variant, out=y)
    assert torch.isfinite(y).all(), "some outputs were never written"
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-3, f"relative Frobenius error {err:.2e}"


@gpu
@pytest.mark.gpu
def test_quantized_linear_equals_fake_quant_linear():
    m, k_total, n, k = 19, 4096, 512, 128
    x = _acts(m, k_total)
    idx = torch.randperm(k_total, device="cuda")
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, 128, 0.85)
    y = ko.quantized_linear(x, w, 0.9, idx)
    x_hat = decode_mixed(encode_mixed(x[:, idx], k, 4, 128, 0.9), torch.float64)
    ref = x_hat @ decode_mixed(w, torch.float64).T
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-3


@gpu
@pytest.mark.gpu
def test_kernel_backend_layers_match_fake_quant_layers():
    import copy

    from atom_lab.config import QuantConfig
    from atom_lab.kernel_linear import KernelActQuant, KernelLinear, convert_to_kernel_backend
    from atom_lab.models import tiny_random_llama
    from atom_lab.quantize import quantize_model

    # Shapes the kernels support: K - k = 1024 (hidden) and 2048 (FFN) with k = 128, G = 128.
    fake = tiny_random_llama(hidden_size=1152, intermediate_size=2176, num_attention_heads=9,
                             num_key_value_heads=3, vocab_size=512).half().cuda()
    qcfg = QuantConfig(name="w4a4", w_bits=4, a_bits=4, outliers=128, group_size=128, a_clip=0.9,
                       w_clip=0.85)
    quantize_model(fake, qcfg, torch.randint(0, 512, (4, 64)), progress=False)
    real = copy.deepcopy(fake)
    summary = convert_to_kernel_backend(real, qcfg)
    assert len(summary["converted"]) == 14 and not summary["skipped"]
    assert sum(isinstance(m, KernelLinear) for m in real.modules()) == 14
    rel = lambda y, ref: ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    ids = torch.randint(0, 512, (2, 48), device="cuda")
    errors = {}
    with torch.no_grad():
        assert torch.isfinite(real(ids).logits).all()
        fake(ids)  # a forward (re)attaches the o_proj input gather hook to the current o_proj
        # Whole-model logits of two W4A4 implementations drift apart (a 1e-3 difference flips
        # 4-bit codes downstream), so compare each norm -> linear path on the same inputs.
        h = torch.randn(2, 48, 1152, device="cuda").half()
        z = torch.randn(2, 48, 2176, device="cuda").half()
        f_layer, r_layer = fake.model.layers[1], real.model.layers[1]
        # the kernels alone on an already reordered input (no gather involved)
        q_fake = f_layer.self_attn.q_proj
        x_g = f_layer.input_layernorm(h)
        alone = KernelLinear(q_fake.packed_weight, q_fake.bias, KernelActQuant(4, 128, 0.9, 128))
        errors["q_proj kernels alone"] = rel(alone(x_g), q_fake(x_g))
        for p in ("q_proj", "k_proj", "v_proj"):
            errors[p] = rel(getattr(r_layer.self_attn, p)(r_layer.input_layernorm(h)),
                            getattr(f_layer.self_attn, p)(f_layer.input_layernorm(h)))
        for p in ("gate_proj", "up_proj"):
            errors[p] = rel(getattr(r_layer.mlp, p)(r_layer.post_attention_layernorm(h)),
                            getattr(f_layer.mlp, p)(f_layer.post_attention_layernorm(h)))
        errors["o_proj"] = rel(r_layer.self_attn.o_proj(h), f_layer.self_attn.o_proj(h))
        errors["down_proj"] = rel(r_layer.mlp.down_proj(z), f_layer.mlp.down_proj(z))
    assert all(e < 3e-3 for e in errors.values()), errors
