"""Outlier channel reordering, folded into the model as Atom does it.

`reorder_indices` sorts each linear input's channels ascending by a calibration metric, so the
top-k (outlier) channels are the LAST k. `apply_reorder` then makes every decoder linear see its
input in that order while the model computes the same function:

  qkv      q/k/v weight columns permuted; input_layernorm replaced by a GatheredNorm that returns
           norm(x)[..., index] (the residual stream itself stays in the original order)
  gate_up  the same with post_attention_layernorm and gate/up
  o        o_proj columns permuted; the attention output is gathered by an InputGather module
           (self_attn.o_proj_gather) through a forward pre-hook on whatever module currently sits
           at self_attn.o_proj (re-attached automatically when the quantizer replaces o_proj)
  down     gate/up output ROWS permuted (free at run time: SiLU(gate) * up is elementwise) and
           down_proj columns permuted; no gather at all

The gathers live outside the linear modules, so replacing q_proj, o_proj, ... with quantized
modules afterwards keeps the reordering. A kernel backend that fuses the gather into its own
activation-quantize kernel sets `fused = True` on the module (see reorder_gather_modules) and
reads `.index` itself.
"""
from __future__ import annotations

import torch
from torch import nn

from atom_lab.calibration import LINEAR_INPUTS, METRICS
from atom_lab.models import decoder_layers

Indices = dict[int, dict[str, torch.Tensor]]
NORM_OF_INPUT = {"qkv": "input_layernorm", "gate_up": "post_attention_layernorm"}


def reorder_indices(stats, metric: str = "hessian") -> Indices:
    """Per layer per input: ascending (stable) argsort of the metric, so the top channels sit last."""
    if metric not in METRICS:
        raise ValueError(f"quant.reorder_metric={metric!r} is not allowed: one of {list(METRICS)}")
    return {layer: {name: torch.argsort(s[metric].float(), stable=True) for name, s in inputs.items()}
            for layer, inputs in stats.items()}


def reorder_stats(stats, indices: Indices):
    """Calibration stats permuted into the reordered channel order (e.g. for static scales)."""
    return {layer: {name: {m: v[indices[layer][name].to(v.device)] if name in indices.get(layer, {})
                           else v for m, v in metrics.items()}
                    for name, metrics in inputs.items()}
            for layer, inputs in stats.items()}


class GatheredNorm(nn.Module):
    """A norm whose output channels arrive in reordered order: norm(x)[..., index]."""

    def __init__(self, norm: nn.Module, index: torch.Tensor):
        super().__init__()
        self.norm = norm
        self.register_buffer("index", index.clone())
        self.fused = False

    @property
    def weight(self):
        return self.norm.weight

    def forward(self, x):
        out = self.norm(x)
        return out if self.fused else out.index_select(-1, self.index)


class InputGather(nn.Module):
    """Gathers a linear's input channels (x[..., index]) through a forward pre-hook on it."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        self.register_buffer("index", index.clone())
        self.fused = False

    def forward(self, x):
        return x if self.fused else x.index_select(-1, self.index)

    def _gather_input(self, module, args):
        return (self(args[0]),) + tuple(args[1:])

    def attach(self, linear: nn.Module):
        """Hook `linear` (idempotent; prepended so that other input hooks see reordered inputs)."""
        hooks = linear._forward_pre_hooks.values()
        if not any(getattr(h, "__self__", None) is self for h in hooks):
            linear.register_forward_pre_hook(self._gather_input, prepend=True)

    def ensure_on_o_proj(self, attn, args):
        """Forward pre-hook of self_attn: follow o_proj when the quantizer has replaced it."""
        self.attach(attn.o_proj)


def _check_permutation(index: torch.Tensor, size: int, where: str):
    if index.dim() != 1 or index.numel() != size or not torch.equal(
            torch.sort(index.cpu()).values, torch.arange(size)):
        raise ValueError(f"reorder index for {where} is not a permutation of {size} channels")


@torch.no_grad()
def _permute_columns(linear: nn.Module, index: torch.Tensor):
    linear.weight.data = linear.weight.data[:, index.to(linear.weight.device)].contiguous()


@torch.no_grad()
def _permute_rows(linear: nn.Module, index: torch.Tensor):
    index = index.to(linear.weight.device)
    linear.weight.data = linear.weight.data[index].contiguous()
    if getattr(linear, "bias", None) is not None:
        linear.bias.data = linear.bias.data[index].contiguous()


def _gather_norm(layer: nn.Module, norm_name: str, index: torch.Tensor):
    norm = getattr(layer, norm_name)
    device = norm.weight.device
    if isinstance(norm, GatheredNorm):
        norm.index = norm.index[index.to(device)]
    else:
        setattr(layer, norm_name, GatheredNorm(norm, index.to(device)))


def _gather_o_input(attn: nn.Module, index: torch.Tensor):
    device = attn.o_proj.weight.device
    gather = getattr(attn, "o_proj_gather", None)
    if isinstance(gather, InputGather):
        gather.index = gather.index[index.to(device)]
        return
    attn.o_proj_gather = InputGather(index.to(device))
    attn.o_proj_gather.attach(attn.o_proj)
    attn.register_forward_pre_hook(attn.o_proj_gather.ensure_on_o_proj)


def apply_reorder(model, indices: Indices):
    """Fold per-layer per-input permutations into the model (inputs missing from `indices` are left)."""
    layers = decoder_layers(model)
    for i, per_input in indices.items():
        layer = layers[i]
        for name, index in per_input.items():
            if name not in LINEAR_INPUTS:
                raise ValueError(f"reorder input {name!r}: allowed {sorted(LINEAR_INPUTS)}")
            linears = [layer.get_submodule(p) for p in LINEAR_INPUTS[name]]
            _check_permutation(index, linears[0].weight.shape[1], f"layer {i} input {name}")
            for linear in linears:
                _permute_columns(linear, index)
            if name in NORM_OF_INPUT:
                _gather_norm(layer, NORM_OF_INPUT[name], index)
            elif name == "o":
                _gather_o_input(layer.self_attn, index)
            else:  # down: push into gate/up output rows
                _permute_rows(layer.mlp.gate_proj, index)
                _permute_rows(layer.mlp.up_proj, index)
    return model


def reorder_gather_modules(model) -> dict[str, nn.Module]:
    """Qualified name -> GatheredNorm / InputGather: every run-time gather the reordering added."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (GatheredNorm, InputGather))}
