"""Packed formats (the kernel contract): nibble packing, mixed W4A4+INT8, the GEMM formula, KV."""
import pytest
import torch

from atom_lab.formats import (
    decode_kv, decode_mixed, encode_kv, encode_mixed, kv_bytes_per_token, mixed_gemm_reference,
    pack_nibbles, unpack_nibbles,
)
from atom_lab.primitives import IntSpec, expand_groups, fake_quant


def _rand(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_nibble_order_and_round_trip():
    codes = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0xE1, 0x87]]  # element 2j low nibble, 2j+1 high nibble
    assert torch.equal(unpack_nibbles(packed, signed=True), codes)
    u = torch.randint(0, 16, (5, 32), dtype=torch.uint8)
    assert torch.equal(unpack_nibbles(pack_nibbles(u), signed=False), u)
    s = torch.randint(-8, 8, (5, 32), dtype=torch.int8)
    assert torch.equal(unpack_nibbles(pack_nibbles(s), signed=True), s)
    with pytest.raises(ValueError, match="even"):
        pack_nibbles(torch.zeros(3, dtype=torch.int8))


def _mixed_fake_quant(x, k, bits, group, clip):
    kn = x.shape[-1] - k
    normal = fake_quant(x[:, :kn], IntSpec(bits=bits, group_size=group, clip=clip))
    if k == 0:
        return normal
    outlier = fake_quant(x[:, kn:], IntSpec(bits=8, group_size=0))
    return torch.cat([normal, outlier], dim=-1)


@pytest.mark.parametrize("K,k,group", [(576, 128, 128), (256, 32, 64), (64, 0, 16), (96, 8, 0)])
def test_encode_decode_mixed_equals_fake_quant(K, k, group):
    x = _rand((6, K)) * torch.linspace(0.5, 4.0, K)  # outlier-ish last columns
    q = encode_mixed(x, k, bits=4, group_size=group, clip=0.9)
    kn = K - k
    assert q.normal.shape == (6, kn // 2) and q.normal.dtype == torch.uint8
    n_groups = 1 if group == 0 else -(-kn // group)  # 576-128 = 448 = 3 x 128 + 64
    assert q.normal_scales.shape == (6, n_groups) and q.normal_scales.dtype == torch.float16
    assert q.outlier.shape == (6, k) and q.outlier.dtype == torch.int8
    assert q.outlier_scales.shape == (6, 1) and q.outlier_scales.dtype == torch.float16
    assert torch.equal(decode_mixed(q), _mixed_fake_quant(x, k, 4, group, 0.9))


def test_mixed_gemm_matches_integer_contract_formula():
    K, k, G = 320, 64, 64
    a = encode_mixed(_rand((5, K), 1), k, 4, G)
    w = encode_mixed(_rand((7, K), 2), k, 4, G)
    qa = unpack_nibbles(a.normal, True).long()
    qw = unpack_nibbles(w.normal, True).long()
    y = torch.zeros(5, 7, dtype=torch.float64)
    for g in range((K - k) // G):  # int32 dot products per group, then scaled
        cols = slice(g * G, (g + 1) * G)
        acc = (qa[:, cols] @ qw[:, cols].T).double()
        y += a.normal_scales[:, g : g + 1].double() * w.normal_scales[:, g].double() * acc
    y += a.outlier_scales.double() * w.outlier_scales.double().T * (
        a.outlier.long() @ w.outlier.long().T).double()
    assert torch.allclose(mixed_gemm_reference(a, w, torch.float64), y, rtol=1e-12, atol=1e-9)


def test_mixed_gemm_error_bounded_by_quantization_steps():
    K, k, G = 256, 32, 32
    x, wt = _rand((16, K), 3), _rand((24, K), 4)
    a, w = encode_mixed(x, k, 4, G), encode_mixed(wt, k, 4, G)
    xa = decode_mixed(a, torch.float64)

    def steps(q):
        normal = expand_groups(q.normal_scales.double(), K - k, G)
        return torch.cat([normal, q.outlier_scales.double().expand(-1, k)], dim=-1) / 2

    bound = steps(a) @ wt.double().abs().T + xa.abs() @ steps(w).T
    err = (mixed_gemm_reference(a, w, torch.float64) - x.double() @ wt.double().T).abs()
    assert torch.all(err <= bound + 1e-9)
    rel = err.norm() / (x @ wt.T).norm()
    assert 0.01 < rel < 0.3  # 4-bit: real but bounded error


def test_encode_mixed_rejects_bad_arguments():
    with pytest.raises(ValueError, match="bits=8"):
        encode_mixed(_rand((2, 8)), 0, bits=8)
    with pytest.raises(ValueError, match="k_outliers"):
        encode_mixed(_rand((2, 8)), 9)


@pytest.mark.parametrize("bits,group", [(4, 0), (4, 32), (3, 16), (2, 0)])
def test_kv_encode_decode(bits, group):
    x = _rand((2, 3, 10, 64)) + 0.7  # [batch, kv_heads, tokens, head_dim], biased: asym matters
    q = encode_kv(x, bits=bits, group_size=group)
    n_groups = 1 if group == 0 else 64 // group
    assert q.codes.shape == (2, 3, 10, 32) and q.codes.dtype == torch.uint8
    assert q.scales.shape == q.zeros.shape == (2, 3, 10, n_groups)
    assert torch.equal(q.zeros, q.zeros.round()) and q.zeros.min() >= 0
    codes = unpack_nibbles(q.codes, signed=False)
    assert int(codes.max()) <= 2 ** bits - 1
    step = expand_groups(q.scales.float(), 64, group)
    assert torch.all((decode_kv(q) - x).abs() <= step / 2 + 1e-5)


def test_kv_bytes_per_token():
    # SmolLM2: head_dim 64, 3 KV heads: 32 code bytes + fp16 scale + fp16 zero per head, K and V
    assert kv_bytes_per_token(64, 3) == 2 * 3 * (32 + 4)
    assert kv_bytes_per_token(128, 32, group_size=64) == 2 * 32 * (64 + 8)
    fp16_bytes = 2 * 3 * 64 * 2
    assert 0.25 * fp16_bytes < kv_bytes_per_token(64, 3) < 0.3 * fp16_bytes  # 4 bits + metadata
