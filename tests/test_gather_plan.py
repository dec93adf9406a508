"""Bank-aware order of a reorder index: within groups only, fewer conflicts, the same GEMM."""
import pytest
import torch

from atom_lab import gather_plan as gp
from atom_lab.cuda import kernel_backend_available
from atom_lab.formats import encode_mixed, unpack_nibbles

LAYOUTS = [(4096, 128, 128), (11008, 128, 128), (4096, 256, 64), (1152, 0, 64)]


@pytest.mark.parametrize("k_total,k,group", LAYOUTS)
def test_bank_aware_order_permutes_within_groups_only(k_total, k, group):
    idx = torch.randperm(k_total, generator=torch.Generator().manual_seed(k_total + k))
    perm = gp.bank_aware_order(idx, k, group)
    assert sorted(perm.tolist()) == list(range(k_total))
    kn = k_total - k
    bounds = [(g, g + group) for g in range(0, kn, group)] + ([(kn, k_total)] if k else [])
    for lo, hi in bounds:  # every group (and the outlier block) keeps its members
        assert sorted(idx[perm[lo:hi]].tolist()) == sorted(idx[lo:hi].tolist())


@pytest.mark.parametrize("k_total,k,group", LAYOUTS)
def test_bank_aware_order_halves_the_gather_wavefronts(k_total, k, group):
    idx = torch.randperm(k_total, generator=torch.Generator().manual_seed(1))
    before = gp.gather_wavefronts(idx, k, group)
    after = gp.gather_wavefronts(idx[gp.bank_aware_order(idx, k, group)], k, group)
    assert before > 2.5 and after < 0.6 * before, (before, after)


@pytest.mark.parametrize("k_total,k,group", LAYOUTS)
def test_in_order_columns_conflict_and_their_bank_aware_order_does_not(k_total, k, group):
    # Lane l reads column 16 l + e: lanes l and l + 4 share a bank (6-8 wavefronts). Reordered
    # within groups, every instruction is conflict-free.
    idx = torch.arange(k_total)
    assert gp.gather_wavefronts(idx, k, group) >= 6
    assert gp.gather_wavefronts(idx[gp.bank_aware_order(idx, k, group)], k, group) == 1.0


def _group_dots(a_codes, w_codes, group):
    """Per (row, weight row, group) INT dot products: what the GEMM accumulates exactly."""
    a = a_codes.long().reshape(a_codes.shape[0], -1, group)
    w = w_codes.long().reshape(w_codes.shape[0], -1, group)
    return torch.einsum("mgc,ngc->mng", a, w)


@pytest.mark.parametrize("k_total,k,group", [(1152, 128, 128), (1024, 256, 64)])
def test_reordered_operands_give_the_same_gemm(k_total, k, group):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, k_total, generator=gen).half()
    w = (torch.randn(7, k_total, generator=gen) * 0.05).half()
    idx = torch.randperm(k_total, generator=gen)
    perm = gp.bank_aware_order(idx, k, group)
    a1, a2 = encode_mixed(x[:, idx], k, 4, group, 0.9), encode_mixed(x[:, idx[perm]], k, 4, group, 0.9)
    w1 = encode_mixed(w[:, idx], k, 4, group, 1.0)
    w2 = gp.permute_packed_columns(w1, perm)
    assert torch.equal(a1.normal_scales, a2.normal_scales)  # same groups: same scales, bit for bit
    assert torch.equal(a1.outlier_scales, a2.outlier_scales)
    assert torch.equal(w1.normal_scales, w2.normal_scales)
    kn = k_total - k
    codes = [(unpack_nibbles(a.normal, signed=True), unpack_nibbles(b.normal, signed=True))
             for a, b in ((a1, w1), (a2, w2))]
    assert torch.equal(_group_dots(*codes[0], group), _group_dots(*codes[1], group))
    out1 = a1.outlier.long() @ w1.outlier.long().T
    out2 = a2.outlier.long() @ w2.outlier.long().T
    assert torch.equal(out1, out2)
    assert torch.equal(codes[1][1], codes[0][1][:, perm[:kn]])  # the weight follows the index


@pytest.mark.gpu
@pytest.mark.skipif(not kernel_backend_available(), reason="needs CuPy and a CUDA GPU")
def test_kernel_gemm_is_bit_identical_with_the_bank_aware_order():
    from atom_lab import kernel_ops as ko

    gen = torch.Generator().manual_seed(4)
    k_total, k, group = 4096, 128, 128
    x = torch.randn(300, k_total, generator=gen).half().cuda()
    w = (torch.randn(512, k_total, generator=gen) * 0.05).half()
    idx = torch.randperm(k_total, generator=gen)
    perm = gp.bank_aware_order(idx, k, group)
    w1 = encode_mixed(w[:, idx], k, 4, group, 1.0)
    w1 = type(w1)(**{f: getattr(w1, f).cuda() for f in ("normal", "normal_scales", "outlier",
                                                         "outlier_scales")},
                  bits=w1.bits, group_size=w1.group_size)
    y1 = ko.mixed_gemm(ko.quantize_mixed(x, k, 4, group, 0.9, idx.cuda()), w1)
    y2 = ko.mixed_gemm(ko.quantize_mixed(x, k, 4, group, 0.9, idx[perm].cuda()),
                       gp.permute_packed_columns(w1, perm))
    assert torch.equal(y1, y2)
