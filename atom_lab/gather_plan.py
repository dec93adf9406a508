"""Bank-aware order of a reorder index for the fused gather of the quantize kernels.

The "wide" and "pipe" quantize kernels stage an FP16 row in shared memory and gather it through
the reorder index: in a warp task of 512 output columns, lane l holds columns 16 l .. 16 l + 15
and the warp's e-th gather instruction reads column 16 l + e of every lane (the outlier block: 8
columns a lane). Input column c lies in shared-memory bank (c // 2) % 32, so a random index costs
~3.5 wavefronts an instruction (bank conflicts).

Permuting the index *within* a quantization group (and within the outlier block) changes nothing
the model computes: a group keeps its members, so its scale (absmax) and the INT32 dot product of
its codes are the same, and the GEMM reads weight columns in the same order as activation columns.
`bank_aware_order` picks such a permutation so that each gather instruction hits distinct banks
where it can; `permute_packed_columns` applies it to a packed weight.
"""
from __future__ import annotations

import numpy as np
import torch

from atom_lab.formats import MixedQuantized, pack_nibbles, unpack_nibbles
from atom_lab.kernel_ops import WIDE_COLS as TASK_COLS  # columns of a warp task

LANE_COLS = 16  # normal columns a lane
OUTLIER_LANE_COLS = 8  # outlier columns a lane
BANKS = 32


def _task_layouts(kn: int, k: int, group_size: int):
    """Per warp task: positions [32 lanes, columns a lane] (-1 where a lane has none) and the
    group of each lane (-1: none)."""
    for task in range(-(-kn // TASK_COLS)):
        pos = task * TASK_COLS + np.arange(32)[:, None] * LANE_COLS + np.arange(LANE_COLS)[None, :]
        pos = np.where(pos < kn, pos, -1)
        yield pos, np.where(pos[:, 0] >= 0, pos[:, 0] // group_size, -1)
    if k:
        pos = np.arange(32)[:, None] * OUTLIER_LANE_COLS + np.arange(OUTLIER_LANE_COLS)[None, :]
        pos = np.where(pos < k, kn + pos, -1)
        yield pos, np.where(pos[:, 0] >= 0, -2, -1)  # the outlier block: one group


def gather_wavefronts(index: torch.Tensor, k_outliers: int, group_size: int) -> float:
    """Shared-memory wavefronts a gather instruction, averaged over the row's warp tasks (1 is
    conflict-free; a random index gives ~3.5)."""
    idx = np.asarray(index.detach().cpu(), dtype=np.int64)
    total = count = 0
    for pos, _ in _task_layouts(len(idx) - k_outliers, k_outliers, group_size):
        for e in range(pos.shape[1]):
            words = np.unique(idx[pos[:, e][pos[:, e] >= 0]] >> 1)
            total += np.bincount(words % BANKS, minlength=BANKS).max()
            count += 1
    return total / count


def bank_aware_order(index: torch.Tensor, k_outliers: int, group_size: int) -> torch.Tensor:
    """A permutation p of the positions, within each group and within the outlier block, such that
    index[p] gathers with fewer bank conflicts. Greedy, one gather instruction at a time: each lane
    takes, from what is left of its group, the column whose bank this instruction has used least
    (a second column of an already used word is free), preferring banks the group still has many
    columns in."""
    idx = np.asarray(index.detach().cpu(), dtype=np.int64)
    perm = np.arange(len(idx))
    for pos, lane_group in _task_layouts(len(idx) - k_outliers, k_outliers, group_size):
        pools = {g: list(pos[lane_group == g][pos[lane_group == g] >= 0])
                 for g in np.unique(lane_group[lane_group != -1])}
        left = {g: np.bincount((idx[p] >> 1) % BANKS, minlength=BANKS) for g, p in pools.items()}
        for e in range(pos.shape[1]):
            used: dict[int, set] = {}
            for lane in range(32):
                g = lane_group[lane]
                if g == -1 or pos[lane, e] < 0:
                    continue
                cand = np.asarray(pools[g])
                words = idx[cand] >> 1
                banks = words % BANKS
                cost = np.array([0 if w in used.get(b, ()) else len(used.get(b, ()))
                                 for w, b in zip(words, banks)])
                best = np.lexsort((-left[g][banks], cost))[0]
                src = pools[g].pop(best)
                perm[pos[lane, e]] = src
                left[g][banks[best]] -= 1
                used.setdefault(int(banks[best]), set()).add(int(words[best]))
    return torch.from_numpy(perm)


def permute_packed_columns(w: MixedQuantized, perm: torch.Tensor) -> MixedQuantized:
    """The packed weight whose input columns follow index[perm] instead of index (perm from
    bank_aware_order: within groups, so every scale stays as it is)."""
    kn = w.k_normal
    perm = perm.to(w.normal.device)
    normal = unpack_nibbles(w.normal, signed=True)[:, perm[:kn]]
    outlier = w.outlier[:, perm[kn:] - kn]
    return MixedQuantized(normal=pack_nibbles(normal), normal_scales=w.normal_scales.clone(),
                          outlier=outlier.contiguous(), outlier_scales=w.outlier_scales.clone(),
                          bits=w.bits, group_size=w.group_size)
