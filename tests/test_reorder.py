import copy

import pytest
import torch
from torch import nn

from atom_lab.calibration import LINEAR_INPUTS, collect_input_stats
from atom_lab.models import decoder_layers, tiny_random_llama
from atom_lab.reorder import (GatheredNorm, InputGather, apply_reorder, reorder_gather_modules,
                              reorder_indices, reorder_stats)

IDS = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(1))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture()
def setup():
    model = tiny_random_llama(seed=3)
    with torch.no_grad():
        reference = model(IDS).logits
    stats = collect_input_stats(model, IDS, progress=False)
    return model, reference, stats


class StandInQuantLinear(nn.Module):
    """What the quantizer does to a reordered model: a new module in the linear's place."""

    def __init__(self, linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())

    def forward(self, x):
        return x @ self.weight.T


def test_indices_sort_ascending_outliers_last(setup):
    _, _, stats = setup
    for metric in ("hessian", "abs_mean", "abs_max"):
        idx = reorder_indices(stats, metric)
        for layer, inputs in stats.items():
            for name, s in inputs.items():
                values = s[metric][idx[layer][name]]
                assert torch.all(values[1:] >= values[:-1])
                assert values[-1] == s[metric].max()
    with pytest.raises(ValueError, match="reorder_metric"):
        reorder_indices(stats, "kurtosis")


@pytest.mark.parametrize("metric", ["hessian", "abs_mean"])
def test_reorder_leaves_logits_unchanged_with_gqa(setup, metric):
    model, reference, stats = setup
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    apply_reorder(model, reorder_indices(stats, metric))
    with torch.no_grad():
        assert rel_err(model(IDS).logits, reference) <= 1e-5


def test_every_linear_input_arrives_reordered(setup):
    model, _, stats = setup
    apply_reorder(model, reorder_indices(stats, "hessian"))
    after = collect_input_stats(model, IDS, progress=False)
    for layer, inputs in after.items():
        for name, s in inputs.items():
            h = s["hessian"]
            assert torch.all(h[1:] >= h[:-1] * (1 - 1e-5)), (layer, name)
            torch.testing.assert_close(h, reorder_stats(stats, reorder_indices(stats, "hessian"))[layer][name]["hessian"],
                                       rtol=1e-4, atol=1e-6)


def test_reorder_survives_linear_replacement_and_deepcopy(setup):
    model, reference, stats = setup
    apply_reorder(model, reorder_indices(stats, "hessian"))
    for layer in decoder_layers(model):
        for paths in LINEAR_INPUTS.values():
            for path in paths:
                parent, child = path.rsplit(".", 1)
                owner = layer.get_submodule(parent)
                setattr(owner, child, StandInQuantLinear(getattr(owner, child)))
    with torch.no_grad():
        assert rel_err(model(IDS).logits, reference) <= 1e-5
        clone = copy.deepcopy(model)
        assert rel_err(clone(IDS).logits, reference) <= 1e-5
        assert rel_err(model(IDS).logits, reference) <= 1e-5  # hooks not stacked by repeated calls


def test_gathers_are_needed_and_listed(setup):
    model, reference, stats = setup
    apply_reorder(model, reorder_indices(stats, "hessian"))
    gathers = reorder_gather_modules(model)
    assert sum(isinstance(m, GatheredNorm) for m in gathers.values()) == 4  # 2 norms x 2 layers
    assert sum(isinstance(m, InputGather) for m in gathers.values()) == 2
    assert "model.layers.0.self_attn.o_proj_gather" in gathers
    for m in gathers.values():
        m.fused = True  # a consumer claiming to gather itself, but nobody does: logits change
    with torch.no_grad():
        assert rel_err(model(IDS).logits, reference) > 1e-2


def test_reorder_twice_composes(setup):
    model, reference, stats = setup
    apply_reorder(model, reorder_indices(stats, "hessian"))
    apply_reorder(model, reorder_indices(collect_input_stats(model, IDS, progress=False), "abs_max"))
    with torch.no_grad():
        assert rel_err(model(IDS).logits, reference) <= 1e-5
    assert len(reorder_gather_modules(model)) == 6


def test_partial_indices_and_bad_permutations(setup):
    model, reference, stats = setup
    idx = reorder_indices(stats, "hessian")
    apply_reorder(model, {1: {"down": idx[1]["down"]}})
    with torch.no_grad():
        assert rel_err(model(IDS).logits, reference) <= 1e-5
    with pytest.raises(ValueError, match="not a permutation"):
        apply_reorder(model, {0: {"qkv": torch.zeros(64, dtype=torch.long)}})
    with pytest.raises(ValueError, match="not a permutation"):
        apply_reorder(model, {0: {"down": torch.arange(64)}})
    with pytest.raises(ValueError, match="allowed"):
        apply_reorder(model, {0: {"lm_head": torch.arange(64)}})
