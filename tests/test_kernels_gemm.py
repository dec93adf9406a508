"""W4A4 kernels: activation quantize (plain / RMSNorm / SiLU*up, gather fused) and the GEMM.

GPU tests compare each kernel with the CPU reference of the packed format on fresh random inputs
and poisoned outputs; they skip without CuPy and a CUDA GPU. The shape checks run anywhere.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from atom_lab import kernel_ops as ko
from atom_lab.cuda import (KernelBackendUnavailable, kernel_backend_available,
                            kernels_dir, source_with_header_digest)
from atom_lab.formats import MixedQuantized, decode_mixed, encode_mixed

gpu = pytest.mark.skipif(not kernel_backend_available(), reason="needs CuPy and a CUDA GPU")
# kernels/w4a4_gemv.cu (gemv, stream, PDL) and the wgmma kernels need sm_90
sm90 = pytest.mark.skipif(not (kernel_backend_available() and ko.has_wgmma()),
                          reason="needs a Hopper GPU (sm_90) and CuPy")


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


def _fp32_neighbours(x: torch.Tensor) -> torch.Tensor:
    """x (float32) and the float32 values one ulp below and above it."""
    bits = x.view(torch.int32)
    return torch.stack([(bits - 1).view(torch.float32), x, (bits + 1).view(torch.float32)])


def _snapped_codes(v: torch.Tensor, r: torch.Tensor, grid_base: float, bias: int) -> torch.Tensor:
    """The wide / pipe kernels' rounding, emulated exactly: y = RN32(v * r + grid_base) (one FMA;
    v * r + grid_base is exact in float64 for these operands), then RN32(y + 1.5 * 2^23 - grid_base
    + bias); the code is the low mantissa bits minus the bias."""
    y = (v.double() * r.double() + grid_base).float()
    z = (y.double() + (12582912.0 - grid_base + bias)).float()
    return z.view(torch.int32) - 0x4B400000 - bias


@pytest.mark.parametrize("bias", [8, 0])
def test_fma_snap_rounding_equals_rint_of_the_quotient(bias):
    """PairQuantizer (kernels/quantize.cu) computes rint(v / s) for fp16 v, s as
    RN(RN(v * r + 768) + 1.5 * 2^23 - 768 + bias), r being rcp.approx(s), which may be any float32
    within one ulp of 1 / s. Checked for every fp16 scale significand, the three such r, and the
    fp16 values v nearest each half-integer multiple t * s, |t| <= 128.5 (ties and near ties are
    the only places where it could differ from torch.round(v / s)). A coarser grid (2^-6, base
    12288 * 16) fails there: the grid must be finer than the 2^-13 gap between a quotient of fp16
    values and a tie."""
    s = (1.0 + torch.arange(1024, dtype=torch.float64) / 1024).half().float()  # scale is invariant
    t = torch.arange(-128, 129, dtype=torch.float64) + 0.5
    near = (t[:, None] * s.double()[None, :]).half()
    step = torch.tensor([-2, -1, 0, 1, 2], dtype=torch.int16)
    v = (near.view(torch.int16)[None] + step[:, None, None]).view(torch.float16).float()
    v = torch.where(torch.isfinite(v), v, torch.zeros_like(v))
    ref = torch.round(v / s).to(torch.int32)  # float32 division, ties to even, as torch computes
    for r in _fp32_neighbours((1.0 / s.double()).float()):
        assert torch.equal(_snapped_codes(v, r, 768.0, bias), ref)
    coarse = _snapped_codes(v, (1.0 / s.double()).float(), 12288.0 * 16, bias)
    assert not torch.equal(coarse, ref)


def _rn32_of_sum(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """RN32(x + y) for float64 x, y, exactly: the float64 sum hi and its error lo (Knuth's
    TwoSum); lo only matters where hi lies exactly halfway between two float32 values."""
    hi = x + y
    yv = hi - x
    lo = (x - (hi - yv)) + (y - yv)
    near = hi.float()
    gap = hi - near.double()
    far = torch.nextafter(near, torch.where(gap > 0, torch.inf, -torch.inf).float())
    halfway = (gap != 0) & (gap.abs() == (far.double() - hi).abs())
    return torch.where(halfway & (lo != 0) & (torch.sign(lo) == torch.sign(gap)), far, near)


@pytest.mark.parametrize("qmax", [1, 3, 7, 127])
def test_scale_division_by_fma_is_correctly_rounded(qmax):
    """group_scale (kernels/quantize.cu) divides a = absmax * clip by qmax as
    q0 = RN(a * rq), RN(q0 + RN(a - q0 * qmax) * rq) with rq = RN(1 / qmax): equal to the IEEE
    quotient for every float32 significand of a (the quotient scales exactly with a's exponent).
    Without the residual step, q0 alone differs."""
    a = (1.0 + torch.arange(1 << 23, dtype=torch.float64) / (1 << 23)).float()
    rq = (torch.tensor(1.0) / qmax).double()
    q0 = (a.double() * rq).float()  # the product is exact in float64: one rounding
    res = (a.double() - q0.double() * qmax).float()  # FMA: exact, one rounding
    q = _rn32_of_sum(q0.double(), res.double() * rq)  # FMA: res * rq exact in float64
    ref = a / qmax  # IEEE float32 division
    assert torch.equal(q, ref)
    assert qmax == 1 or not torch.equal(q0, ref)


def test_compile_cache_key_follows_the_local_headers(tmp_path):
    (tmp_path / "helpers.cuh").write_text("#define SCALE 1\n")
    (tmp_path / "k.cu").write_text('#include "helpers.cuh"\nextern "C" __global__ void k() {}\n')
    before = source_with_header_digest(tmp_path / "k.cu")
    (tmp_path / "helpers.cuh").write_text("#define SCALE 2\n")
    after = source_with_header_digest(tmp_path / "k.cu")
    assert before != after and before.startswith((tmp_path / "k.cu").read_text())
    for name in ("w4a4_gemm", "w4a4_gemm_sm90", "w4a4_gemv"):  # the shared helpers are hashed
        assert '#include "w4a4_common.cuh"' in (kernels_dir() / f"{name}.cu").read_text()


def test_compile_cache_key_follows_headers_included_by_headers(tmp_path):
    """w4a4_common.cuh includes mbarrier.cuh and shared_words.cuh: an edit there must rebuild
    the kernels that include w4a4_common.cuh."""
    (tmp_path / "inner.cuh").write_text("#define SCALE 1\n")
    (tmp_path / "outer.cuh").write_text('#pragma once\n#include "inner.cuh"\n')
    (tmp_path / "k.cu").write_text('#include "outer.cuh"\nextern "C" __global__ void k() {}\n')
    before = source_with_header_digest(tmp_path / "k.cu")
    (tmp_path / "inner.cuh").write_text("#define SCALE 2\n")
    assert source_with_header_digest(tmp_path / "k.cu") != before


def test_quantize_dispatch_falls_back_where_staged_rows_overflow_shared_memory():
    k_total = 28672 + 128  # Llama-70B FFN width: SiLU*up rows staged twice do not fit a SM
    assert ko.choose_quant_variant(4096, k_total, plain=False) == "wide"
    assert ko.choose_quant_variant(4096, k_total) == "pipe"
    variant, smem = ko.fit_quant_variant("auto", 4096, 28672, k_total, fused_up=True, plain=False)
    assert variant == "row" and smem + 1024 <= ko.SMEM_PER_SM
    assert ko.fit_quant_variant("auto", 4096, 28672, k_total, False, plain=False)[0] == "wide"
    assert ko.fit_quant_variant("auto", 4096, 28672, k_total, False, sm90=True)[0] == "pipe"
    assert ko.fit_quant_variant("auto", 4096, 28672, k_total, False, sm90=False)[0] == "wide"
    with pytest.raises(ko.KernelShapeError, match="variant=wide4 with K=28800 needs"):
        ko.fit_quant_variant("wide4", 4096, 28672, k_total, fused_up=False)


def test_pipe_quantize_is_refused_clearly_where_it_cannot_run():
    gate = torch.randn(2, 1024).half()
    with pytest.raises(ko.KernelShapeError, match="variant='pipe' quantizes plain rows only"):
        ko.silu_mul_quantize_mixed(gate, gate, 128, variant="pipe")
    with pytest.raises(ko.KernelShapeError, match="variant='pipe' needs an sm_90 GPU"):
        ko.fit_quant_variant("pipe", 4096, 3968, 4096, fused_up=False, sm90=False)
    for m in (1, 256, 1024, 4096):  # "auto" without sm_90 never picks the pipe kernel
        assert ko.fit_quant_variant("auto", m, 3968, 4096, False, sm90=False)[0] != "pipe"


def test_pipe_quantize_layout_fits_a_sm():
    # replicas of one warp a task of the row (normal tasks of 512 columns + the outlier block),
    # each with its own ring of staged rows
    assert ko.pipe_layout(4096 - 128, 4096) == (27, 3, 2)  # 9 tasks
    assert ko.pipe_layout(1024 - 128, 1024) == (24, 8, 2)  # 3 tasks: 8 rings of 2 rows fill the bars
    assert ko.pipe_layout(11008 - 128, 11008) == (23, 1, 3)  # 23 tasks
    assert ko.pipe_layout(28672, 28800) == (ko.PIPE_MAX_WARPS, 1, 3)  # 57 tasks: several a warp
    for k_total in (1152, 4096, 11008, 28800):
        warps, replicas, staged = ko.pipe_layout(k_total - 128, k_total)
        assert staged >= 2 and replicas * staged <= ko.PIPE_MAX_BUFFERS and warps <= ko.PIPE_MAX_WARPS
        variant, smem = ko.fit_quant_variant("pipe", 4096, k_total - 128, k_total, False, sm90=True)
        assert variant == "pipe" and smem + 1024 + 16 * ko.PIPE_MAX_BUFFERS <= ko.SMEM_PER_SM
    assert ko.pipe_layout(120000 - 128, 120000) == (0, 0, 0)
    with pytest.raises(ko.KernelShapeError, match="variant=pipe with K=120000"):
        ko.fit_quant_variant("pipe", 4096, 120000 - 128, 120000, False, sm90=True)


def test_dispatch_covers_every_m():
    for m in range(1, 8193):
        assert ko.choose_gemm_variant(m) in ko.GEMM_VARIANTS
        assert ko.choose_quant_variant(m) in ko.QUANT_VARIANTS
        for n, k_total in ((4096, 4096), (11008, 4096), (4096, 11008), (250, 1104)):
            assert ko.choose_gemm_variant(m, n, k_total) in ko.GEMM_VARIANTS
            assert ko.choose_quant_variant(m, k_total) in ko.QUANT_VARIANTS


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
    (2000, 1152, 128, 128, 4, 0.9, True),  # pipe: 16 rows a block through 8 buffers (ring wraps)
    (600, 17408, 256, 64, 4, 0.9, True),  # pipe: 34 tasks a row, more than its 27 warps
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
@pytest.mark.parametrize("variant", ["row", "ring", "ring_b1", "wide", "wide4"])
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


def _check_against_reference(a, w, with_bias: bool, variant: str, runs: int) -> None:
    """mixed_gemm(variant) on NaN-poisoned outputs, `runs` times (fresh poison each time), against
    the float64 reference of the format: every output written, relative Frobenius error < 1e-3."""
    m, n = a.normal.shape[0], w.normal.shape[0]
    bias = torch.randn(n, device="cuda").half() if with_bias else None
    ref = decode_mixed(a, torch.float64) @ decode_mixed(w, torch.float64).T
    if bias is not None:
        ref += bias.double()
    for _ in range(runs):
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        ko.mixed_gemm(a, w, bias, variant=variant, out=y)
        assert torch.isfinite(y).all(), "some outputs were never written"
        err = ((y.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-3, f"relative Frobenius error {err:.2e}"


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
    if variant in ko.WG_VARIANTS and not ko.has_wgmma():
        pytest.skip("wgmma kernels need a Hopper GPU (sm_90a)")
    a = encode_mixed(_acts(m, k_total), k, 4, group, 0.9)
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, group, 0.85)
    _check_against_reference(a, w, with_bias, variant, runs=1)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [4, 19])  # 4: the early-start (PDL) decode GEMV behind its producer
def test_quantized_linear_equals_fake_quant_linear(m):
    k_total, n, k = 4096, 512, 128
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


# ------------------------------------------------------------- round 3: input-side clamp, gemv


@pytest.mark.parametrize("qmax", [7, 3, 1, 127])
def test_clamping_the_input_gives_the_reference_codes(qmax):
    """The wide quantize kernel clamps x (fp16) to [B_lo, B_hi] = [max(-(qmax+1) s, -65504),
    fp16(qmax s)] BEFORE dividing, instead of clamping rint(x / s). Checked here for every finite
    fp16 x against scales spanning the whole reachable range (1e-5 .. 65504 / qmax, subnormal fp16
    scales included): the codes are identical to torch.round(x / s).clamp(-(qmax+1), qmax)."""
    bits = torch.arange(0, 0x7C00, dtype=torch.int32)  # finite non-negative fp16
    x = torch.cat([bits, bits | 0x8000]).to(torch.int16).view(torch.float16).float()
    lo_s, hi_s = torch.tensor([1e-5, 65504.0 / qmax]).half().view(torch.int16).tolist()
    s_bits = torch.unique(torch.cat([torch.linspace(lo_s, hi_s, 300).round().to(torch.int16),
                                     torch.tensor([lo_s, hi_s], dtype=torch.int16)]))
    for s16 in s_bits.view(torch.float16):
        s = s16.float()
        b_hi = (qmax * s).half().float()
        b_lo = torch.clamp(-(qmax + 1) * s, min=-65504.0).half().float()
        ours = torch.round(torch.minimum(torch.maximum(x, b_lo), b_hi) / s)
        ref = torch.round(x / s).clamp(-(qmax + 1), qmax)
        assert torch.equal(ours, ref), f"scale {s.item()!r}"


def test_gemv_refuses_more_groups_than_its_registers_hold():
    most = ko.GEMV_CONSUMERS * ko.GEMV_GROUPS_PER_WARP[("gemv_m8", 128)]
    with pytest.raises(ko.KernelShapeError, match=f"{most + 1} groups"):
        ko.gemv_plan("gemv_m8", (most + 1) * 128, 128, 128, [])


def _tie_and_extreme_rows(k_total: int, k: int) -> torch.Tensor:
    """Rows whose groups hit exact rounding ties (x / s = n + 1/2 for s = 1, 2, 3), fp16 extremes
    (+-65504, clipped codes), all-zero groups (scale 1e-5) and subnormal values."""
    kn = k_total - k
    rows = []
    for scale in (1.0, 2.0, 3.0):
        ties = torch.arange(-8, 8).float() + 0.5
        g = (ties * scale).repeat(kn // 16)[:kn]
        g[::64] = 7 * scale  # absmax 7 s: the group scale is exactly s
        rows.append(g)
    big = torch.linspace(-65504, 65504, kn)
    rows.append(big)
    rows.append(torch.zeros(kn))
    rows.append(torch.linspace(-6e-5, 6e-5, kn))
    x = torch.stack(rows)
    out = torch.randn(x.shape[0], k) * 10
    out[0, :] = torch.arange(k).float() - k / 2 + 0.5  # ties in the INT8 block too
    return torch.cat([x, out], 1).half()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(ko.QUANT_VARIANTS))
@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_quantize_kernels_match_the_reference_at_ties_and_extremes(variant, clip):
    k_total, k = 1152, 128
    x = _tie_and_extreme_rows(k_total, k).cuda()
    ref = encode_mixed(x.cpu(), k, 4, 128, clip)
    out = _poisoned(x.shape[0], k_total - k, k, 128, 4, 0xFF)
    ko.quantize_mixed(x, k, 4, 128, clip, None, out=out, variant=variant)
    agree = ko.mixed_agreement(out, ref)
    assert all(v == 1.0 for key, v in agree.items() if key.endswith("equal")), agree


@gpu
@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(ko.GEMV_VARIANTS) + sorted(ko.STREAM_VARIANTS))
@pytest.mark.parametrize("m,n,k_total,k,group,with_bias", [
    (1, 264, 1152, 128, 128, True),
    (5, 1056, 2176, 0, 64, False),
    (8, 200, 1280, 256, 128, True),    # N % 8 != 0: the last octet is copied without bulk copies
    (9, 512, 1104, 16, 64, False),
    (16, 11008, 4224, 128, 128, True),  # 11 octets a CTA: the 8-slot ring wraps around; streamt:
                                        # 688 tiles, 3 a CTA (both partial-tile buffers reused)
    (13, 2112, 12800, 256, 128, False),  # 98 groups: 7 a gemv consumer, 7 stream chunks a warp
    (37, 96, 1152, 128, 128, True),    # several token tiles (gridDim.y)
])
def test_gemv_matches_the_format_reference(variant, m, n, k_total, k, group, with_bias):
    a = encode_mixed(_acts(m, k_total), k, 4, group, 0.9)
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, group, 0.85)
    if variant.startswith("streamt") and (k_total - k) // group > ko.STREAMT_MAX_GROUPS:
        with pytest.raises(ko.KernelShapeError, match="groups"):
            ko.mixed_gemm(a, w, variant=variant)
        return
    _check_against_reference(a, w, with_bias, variant, runs=2)  # a race would move the error


@gpu
@sm90
@pytest.mark.gpu
def test_gemv_refuses_a_k_too_long_for_its_registers():
    most = ko.GEMV_CONSUMERS * ko.GEMV_GROUPS_PER_WARP[("gemv2_m8", 128)]
    k_total, k = (most + 1) * 128 + 128, 128
    a = encode_mixed(_acts(2, k_total), k, 4, 128, 0.9)
    w = encode_mixed((torch.randn(64, k_total, device="cuda") * 0.05).half(), k, 4, 128, 0.85)
    with pytest.raises(ko.KernelShapeError, match="groups"):
        ko.mixed_gemm(a, w, variant="gemv2_m8")


def test_early_start_launches_only_for_static_weights():
    for m in (1, 8, 16):
        for n, form in ((4096, "stream_"), (11008, "streamt_")):
            static = ko.auto_gemm_variant(m, n, 4096, static_weights=True)
            plain = ko.auto_gemm_variant(m, n, 4096, static_weights=False)
            assert static.endswith("_pdl") and not plain.endswith("_pdl")
            assert static.startswith(form) and plain.startswith(form)
            assert plain in ko.GEMM_VARIANTS and static in ko.GEMM_VARIANTS
    assert ko.auto_gemm_variant(4096, 4096, 4096, False) == ko.choose_gemm_variant(4096)


@gpu
@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 11])
def test_auto_dispatch_falls_back_from_the_persistent_stream_on_a_long_k(m):
    """K - k = 11008 - 128: 85 groups, more than streamt's registers hold; "auto" picks streamt
    for M <= 16 at a large N and must run stream instead (forcing streamt raises, naming the
    groups)."""
    k_total, k, n = 11008, 128, ko.STREAMT_MIN_N
    assert ko.choose_gemm_variant(m, n, k_total, static_weights=False).startswith("streamt")
    a = encode_mixed(_acts(m, k_total), k, 4, 128, 0.9)
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, 128, 0.85)
    with pytest.raises(ko.KernelShapeError, match="85 groups"):
        ko.mixed_gemm(a, w, variant=ko.choose_gemm_variant(m, n, k_total, static_weights=False))
    y = ko.mixed_gemm(a, w)  # auto with unknown weights: the plain stream launch
    ref = decode_mixed(a, torch.float64) @ decode_mixed(w, torch.float64).T
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-3


# ------------------------------------------------------------------ round 4: small-M "stream"


def test_stream_variants_name_kernels_of_the_gemv_source():
    """Each stream variant launches a kernel defined in w4a4_gemv.cu (stream: DEFINE_STREAM,
    streamt: DEFINE_STREAMT) with the token tile, CTA size (STREAM_WARPS warps) and chunk size the
    source uses, and a _pdl variant the very same kernel as its plain twin."""
    d = _cu_defines("w4a4_gemv.cu")
    assert (d["STREAM_WARPS"], d["STREAM_GROUPS"]) == (ko.STREAM_WARPS, ko.STREAM_GROUPS)
    src = (Path(ko.__file__).resolve().parent.parent / "kernels" / "w4a4_gemv.cu").read_text()
    for variant, (tile, rows, threads) in ko.STREAM_VARIANTS.items():
        macro = "DEFINE_STREAMT" if variant.startswith("streamt") else "DEFINE_STREAM"
        for group in ko.SUPPORTED_GROUPS:
            name = ko.stream_kernel_name(variant, group)
            tiles = int(re.search(rf"{macro}\({name}, {group}, (\d)\)", src).group(1))
            assert 8 * tiles == tile
        assert (threads, rows) == (32 * ko.STREAM_WARPS, 16)
    assert f"__launch_bounds__(STREAM_WARPS * 32, {ko.STREAM_CTAS_PER_SM})" in src
    assert ko.stream_kernel_name("stream_m16_pdl", 64) == ko.stream_kernel_name("stream_m16", 64)


@gpu
@sm90
@pytest.mark.gpu
@pytest.mark.parametrize("variant, n", [("stream_m8_pdl", 1040), ("stream_m16_pdl", 1040),
                                        ("streamt_m8_pdl", 1040), ("streamt_m16_pdl", 1040),
                                        ("streamt_m8_pdl", ko.STREAMT_MIN_N),
                                        ("streamt_m16_pdl", ko.STREAMT_MIN_N)])
def test_pdl_gemm_in_a_graph_reads_what_its_producer_wrote(variant, n):
    """A graph of quantize (writes the activation operand) then the PDL GEMM, replayed on freshly
    poisoned buffers: the GEMM's activation reads wait for the producer (griddepcontrol.wait), so
    every replay gives the reference of the new activations; and it equals the plain launch.
    N = STREAMT_MIN_N: the dispatched streamt walks several weight tiles a CTA."""
    m, k_total, k = (5 if "m8" in variant else 16), 4224, 128
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, 128, 0.85)
    x = _acts(m, k_total)
    a = _poisoned(m, k_total - k, k, 128, 4, 0xFF)
    y = torch.empty(m, n, dtype=torch.float16, device="cuda")

    def step():
        ko.quantize_mixed(x, k, 4, 128, 0.9, None, out=a)
        ko.mixed_gemm(a, w, variant=variant, out=y)

    step()  # compile and load outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(3):
        x.copy_(_acts(m, k_total))
        for t, fill in ((a.normal, 0xFF), (a.normal_scales, float("nan")), (a.outlier, -1),
                        (a.outlier_scales, float("nan")), (y, float("nan"))):
            t.fill_(fill)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(y).all(), "the GEMM read poisoned activations or skipped outputs"
        ref = decode_mixed(a, torch.float64) @ decode_mixed(w, torch.float64).T
        assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-3
        plain = ko.mixed_gemm(a, w, variant=variant.removesuffix("_pdl"))
        assert torch.equal(plain, y)


# ------------------------------------------------------------- round 3: large-M wgmma kernels


def _cu_defines(name: str) -> dict:
    src = (Path(ko.__file__).resolve().parent.parent / "kernels" / name).read_text()
    return {key: int(val) for key, val in re.findall(r"#define (\w+) \(?(\d+)\)?\s", src)}


@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("groups", [8, 31, 170])
def test_wgmma_shared_memory_matches_the_kernel_layout(groups, group):
    """gemm_smem_bytes must reserve what gemm_wg lays out, read off the .cu source's constants and
    DEFINE_WG lines: unpacked stages, their float scales (two groups a stage), two mbarriers a
    stage, the packed ring, the consumers' activation ring, the tile's fp16 weight scales and 1024
    bytes to align the swizzled stages."""
    d = _cu_defines("w4a4_gemm_sm90.cu")
    src = (Path(ko.__file__).resolve().parent.parent / "kernels" / "w4a4_gemm_sm90.cu").read_text()
    assert (d["STAGES"], d["RING"], d["STAGE_K"]) == (ko.WG_STAGES, ko.WG_RING, ko.WG_STAGE_K)
    tile_n, stage_k = d["TILE_N"], d["STAGE_K"]
    acp_slot = 2 * 2 * 128 * 16 + 2 * 2 * 128 * 4 * (stage_k // group)  # ACP_SLOT(G)
    for variant, layout in ko.WG_LAYOUT.items():
        line = re.search(rf"DEFINE_WG\(w4a4_gemm_{variant}_g{group}, {group}, \d, (\w+), (\w+), (\d+)\)",
                         src)
        stages, ring, acp = (d[v] if v in d else int(v) for v in line.groups())
        assert (stages, ring, acp) == layout, variant
        want = (stages * (tile_n * stage_k + 4 * 2 * tile_n + 16) + ring * tile_n * d["PACKED_BYTES"]
                + acp * acp_slot + 2 * tile_n * groups + 1024)
        assert ko.gemm_smem_bytes(variant, group, group * groups) == want, variant
    # the register split of setmaxnreg must stay inside the pool of a 384 x 168 launch
    assert 128 * d["PRODUCER_REGS"] + 256 * d["CONSUMER_REGS"] <= 384 * 168


@pytest.mark.parametrize("variant", sorted(ko.WGP_STAGES))
def test_persistent_wgmma_shared_memory_matches_the_kernel_layout(variant):
    """gemm_smem_bytes of a wgp* kernel must equal WgpLayout<CW, STG>::BYTES + 1024, read off the
    .cu constants and the DEFINE_WGP line; it does not depend on K and fits one CTA a SM."""
    d = _cu_defines("w4a4_gemm_sm90.cu")
    src = (Path(ko.__file__).resolve().parent.parent / "kernels" / "w4a4_gemm_sm90.cu").read_text()
    _, cw, stages = map(int, re.search(rf"DEFINE_WGP\(w4a4_gemm_{variant}_g128, (\d+), (\d+), (\d+),",
                                       src).groups())
    assert stages == ko.WGP_STAGES[variant] and 64 * cw == ko.GEMM_VARIANTS[variant][0]
    assert (d["WGP_RING"], d["SCALE_WORDS"]) == (ko.WGP_RING, ko.WGP_SCALE_WORDS)
    rows, tile_n, words = 64 * cw, d["TILE_N"], d["SCALE_WORDS"]
    per_stage = (tile_n * d["STAGE_K"] + rows * d["PACKED_BYTES"] + rows * 4 * words
                 + 4 * 2 * tile_n + 16)
    want = stages * per_stage + d["WGP_RING"] * tile_n * (d["PACKED_BYTES"] + 4 * words) + 1024
    assert ko.gemm_smem_bytes(variant, 128, 128 * 600) == want <= ko.SMEM_PER_SM
    # setmaxnreg moves registers inside the launch's pool: the split must fit the register file
    two, three = map(int, re.search(r"CONSUMER = CW == 2 \? (\d+) : (\d+);", src).groups())
    assert 128 * d["WGP_PRODUCER_REGS"] + 128 * cw * (two if cw == 2 else three) <= 65536


def test_dispatch_takes_wgmma_only_on_hopper_from_its_threshold(monkeypatch):
    monkeypatch.setattr(ko, "has_wgmma", lambda: False)
    assert all(ko.choose_gemm_variant(m) not in ko.WG_VARIANTS for m in range(1, 8193))
    monkeypatch.setattr(ko, "has_wgmma", lambda: True)
    assert ko.choose_gemm_variant(ko.WG_MIN_M) == ko.WG_DEFAULT in ko.WG_VARIANTS
    assert ko.choose_gemm_variant(8192) == ko.WG_DEFAULT
    assert ko.choose_gemm_variant(ko.WG_MIN_M - 1) not in ko.WG_VARIANTS


def test_wgmma_variant_refuses_a_k_too_long_for_shared_memory():
    kn = 128 * 600  # 600 groups of weight scales a tile do not fit next to the stages
    assert ko.gemm_smem_bytes("wg_m128", 128, kn) > ko.SMEM_PER_SM


wgmma = sm90


@wgmma
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(ko.WG_VARIANTS))
@pytest.mark.parametrize("m,n,k_total,k,group,with_bias", [
    (1, 256, 1024, 128, 128, False),
    (77, 250, 1168, 16, 64, True),       # odd M, N not a multiple of the 128-column tile
    (130, 384, 1104, 16, 64, False),     # 17 groups of 64: the last stage holds one group
    (1000, 384, 4224, 256, 128, True),   # two outlier stages
    (1000, 1030, 2112, 64, 64, False),
    (4133, 520, 2176, 128, 128, False),  # M > 4096, not a multiple of the 128-row tile
    (512, 256, 4096, 0, 128, True),      # no outliers
    (300, 128, 1216, 192, 64, False),    # outliers not a multiple of the 128-column stage
    (3000, 1300, 1152, 128, 128, True),  # more tiles than SMs: a persistent CTA walks several
    (2001, 1030, 1216, 64, 64, False),   # the same at G = 64, odd M
    (257, 256, 11136, 128, 128, False),  # long K: 86 scale groups a row
])
def test_wgmma_gemm_matches_the_format_reference(variant, m, n, k_total, k, group, with_bias):
    a = encode_mixed(_acts(m, k_total), k, 4, group, 0.9)
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, group, 0.85)
    _check_against_reference(a, w, with_bias, variant, runs=2)  # a warpgroup race would move it


@wgmma
@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(ko.WGP_STAGES))
def test_persistent_grid_equals_one_cta_a_tile(variant):
    """The persistent walk (stage counters running on across tiles) computes exactly what one
    CTA a tile computes: same bits, on an M and N that give each CTA several tiles."""
    m, n, k_total, k, group = 2600, 1416, 2176, 128, 128
    a = encode_mixed(_acts(m, k_total), k, 4, group, 0.9)
    w = encode_mixed((torch.randn(n, k_total, device="cuda") * 0.05).half(), k, 4, group, 0.85)
    outs = []
    for persistent in (True, False):
        y = torch.full((m, n), float("nan"), dtype=torch.float16, device="cuda")
        ko.launch_wgmma(variant, group, m, n, k_total - k, ko.gemm_kernel_args(a, w, None, y),
                        y.device, persistent=persistent)
        outs.append(y)
    torch.cuda.synchronize()
    assert torch.isfinite(outs[0]).all()
    assert torch.equal(outs[0], outs[1])


@wgmma
@pytest.mark.gpu
def test_auto_dispatch_leaves_wgmma_where_the_tile_scales_overflow_shared_memory():
    k_total, k = 600 * 128 + 128, 128  # 600 weight-scale groups a tile: more than fits
    a = encode_mixed(_acts(256, k_total), k, 4, 128, 0.9)
    w = encode_mixed((torch.randn(128, k_total, device="cuda") * 0.05).half(), k, 4, 128, 0.85)
    with pytest.raises(ko.KernelShapeError, match="shared memory"):
        ko.mixed_gemm(a, w, variant="wg_m128")
    y = ko.mixed_gemm(a, w)
    ref = decode_mixed(a, torch.float64) @ decode_mixed(w, torch.float64).T
    assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-3
