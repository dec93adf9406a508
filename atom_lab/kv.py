"""KV-cache fake quantization through the transformers attention path (Atom: 4-bit, asymmetric).

K and V are quantized per token per head (groups of `kv_group_size` inside a head, 0 = the whole
head) with the same IntSpec as formats.encode_kv / decode_kv, so fake-quant and the packed KV
format give the same numbers.

Where it happens:
  V, and K when quant.k_before_rope=False: in a wrapper attention function registered with
    transformers' AttentionInterface as "atom_kv_<base>" (base = the model's sdpa / eager / ...
    implementation, whose mask function is registered under the same name). It quantizes the key
    and value states it is handed, after RoPE and the cache update, right before softmax(QK^T)V.
    Quantization is a function of each token's own vector, so re-quantizing cached tokens at
    every decode step gives the same numbers as quantizing each token once.
  K when quant.k_before_rope=True (Atom's fake-quant): a forward hook on k_proj quantizes its
    output per head, before RoPE. The hook follows k_proj when the quantizer replaces it.
Each attention module gets a `kv_quant` child (KVFakeQuant) holding the settings.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from atom_lab.config import QuantConfig
from atom_lab.models import decoder_layers, model_dims
from atom_lab.formats import kv_spec
from atom_lab.primitives import fake_quant

WRAPPER_PREFIX = "atom_kv_"


class KVFakeQuant(nn.Module):
    """KV fake-quant settings of one attention module, and the hooks that apply them."""

    def __init__(self, bits: int, group_size: int, clip: float, k_before_rope: bool, head_dim: int,
                 base_attention: str):
        super().__init__()
        self.spec = kv_spec(bits, group_size, clip)
        self.k_before_rope = k_before_rope
        self.head_dim = head_dim
        self.base_attention = base_attention
        self.enabled = True

    def extra_repr(self) -> str:
        return (f"bits={self.spec.bits}, group={self.spec.group_size}, clip={self.spec.clip}, "
                f"k_before_rope={self.k_before_rope}")

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """Fake-quantize [..., head_dim] states (one group set per token per head)."""
        return fake_quant(states, self.spec) if self.enabled else states

    def _quantize_k_output(self, k_proj, args, output):
        if not (self.enabled and self.k_before_rope):
            return output
        return self(output.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    def attach(self, k_proj: nn.Module):
        hooks = k_proj._forward_hooks.values()
        if not any(getattr(h, "__self__", None) is self for h in hooks):
            k_proj.register_forward_hook(self._quantize_k_output)

    def detach(self, attn: nn.Module):
        """Remove this module's hooks from attn and its k_proj (handles would not survive deepcopy)."""
        self.enabled = False
        for hooks in (attn._forward_pre_hooks, attn.k_proj._forward_hooks):
            for key in [k for k, h in hooks.items() if getattr(h, "__self__", None) is self]:
                del hooks[key]

    def ensure_on_k_proj(self, attn, args):
        """Forward pre-hook of self_attn: follow k_proj when the quantizer has replaced it."""
        if self.k_before_rope:
            self.attach(attn.k_proj)


def _base_attention_fn(module: nn.Module, base: str):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[base]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if base != "eager" or eager is None:
        raise ValueError(f"attention implementation {base!r} of {type(module).__name__} cannot be "
                         f"wrapped for KV quantization; use attn_implementation sdpa or eager")
    return eager


def kv_quant_attention(module, query, key, value, attention_mask, **kwargs):
    """The registered wrapper: quantize K (after RoPE) and V, then run the base implementation."""
    kvq = module.kv_quant
    if not kvq.k_before_rope:
        key = kvq(key)
    value = kvq(value)
    return _base_attention_fn(module, kvq.base_attention)(module, query, key, value, attention_mask,
                                                          **kwargs)


def _register_wrapper(base: str) -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = WRAPPER_PREFIX + base
    AttentionInterface.register(name, kv_quant_attention)
    if base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def _current_base(model) -> str:
    impl = model.config._attn_implementation or "eager"
    return impl[len(WRAPPER_PREFIX):] if impl.startswith(WRAPPER_PREFIX) else impl


def apply_kv_quant(model, qcfg):
    """Install KV fake-quant per qcfg (kv_bits, kv_group_size, kv_clip, k_before_rope); kv_bits 16
    removes it. Returns the model."""
    qcfg = QuantConfig.coerce(qcfg)
    hidden, intermediate, head_dim = model_dims(model)
    qcfg.validate_for_model(hidden, intermediate, head_dim)
    base = _current_base(model)
    remove_kv_quant(model)
    if not qcfg.quantizes_kv:
        return model
    name = _register_wrapper(base)
    for layer in decoder_layers(model):
        attn = layer.self_attn
        attn.kv_quant = KVFakeQuant(qcfg.kv_bits, qcfg.kv_group_size, qcfg.kv_clip,
                                    qcfg.k_before_rope, head_dim, base)
        attn.kv_quant.ensure_on_k_proj(attn, ())
        attn.register_forward_pre_hook(attn.kv_quant.ensure_on_k_proj)
    model.config._attn_implementation = name
    return model


def remove_kv_quant(model):
    """Undo apply_kv_quant: hooks removed, back to the base attention implementation."""
    for layer in decoder_layers(model):
        kvq = getattr(layer.self_attn, "kv_quant", None)
        if isinstance(kvq, KVFakeQuant):
            kvq.detach(layer.self_attn)
            del layer.self_attn.kv_quant
    model.config._attn_implementation = _current_base(model)
    return model


def kv_quant_modules(model) -> dict[str, KVFakeQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, KVFakeQuant)}
