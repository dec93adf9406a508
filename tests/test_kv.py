import copy
import math

import pytest
import torch
import torch.nn.functional as F

from atom_lab.config import ConfigError, QuantConfig
from atom_lab.formats import decode_kv, encode_kv
from atom_lab.kv import KVFakeQuant, apply_kv_quant, kv_quant_modules, remove_kv_quant
from atom_lab.models import decoder_layers, tiny_random_llama
from test_reorder import StandInQuantLinear

IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def rms_norm(x, norm):
    var = x.float().pow(2).mean(-1, keepdim=True)
    return norm.weight * (x.float() * torch.rsqrt(var + norm.variance_epsilon))


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def reference_logits(model, ids, kv_roundtrip, k_before_rope):
    """An independent eager Llama forward, with K/V passed through the packed KV format."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    B, L = ids.shape
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    freqs = torch.arange(L).float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    causal = torch.full((L, L), float("-inf")).triu(1)
    x = model.model.embed_tokens(ids)
    for layer in decoder_layers(model):
        attn, mlp = layer.self_attn, layer.mlp
        h = rms_norm(x, layer.input_layernorm)
        q = F.linear(h, attn.q_proj.weight).view(B, L, heads, d).transpose(1, 2)
        k = F.linear(h, attn.k_proj.weight).view(B, L, kv_heads, d)
        v = F.linear(h, attn.v_proj.weight).view(B, L, kv_heads, d).transpose(1, 2)
        if k_before_rope:
            k = kv_roundtrip(k)
        k = k.transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if not k_before_rope:
            k = kv_roundtrip(k)
        v = kv_roundtrip(v)
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # GQA: query head j reads KV head j // group
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1)
        x = x + F.linear((p @ v).transpose(1, 2).reshape(B, L, -1), attn.o_proj.weight)
        h = rms_norm(x, layer.post_attention_layernorm)
        x = x + F.linear(F.silu(F.linear(h, mlp.gate_proj.weight)) * F.linear(h, mlp.up_proj.weight),
                         mlp.down_proj.weight)
    return F.linear(rms_norm(x, model.model.norm), model.lm_head.weight)


@pytest.fixture()
def model():
    return tiny_random_llama(seed=4)


def test_reference_forward_matches_transformers_without_quantization(model):
    ref = reference_logits(model, IDS, lambda t: t, k_before_rope=True)
    assert rel_err(ref, logits(model)) < 1e-5


@pytest.mark.parametrize("k_before_rope", [True, False])
@pytest.mark.parametrize("group, clip", [(0, 1.0), (8, 0.9)])
def test_kv4_matches_hand_computed_reference_with_gqa(model, k_before_rope, group, clip):
    qcfg = QuantConfig(kv_bits=4, kv_group_size=group, kv_clip=clip, k_before_rope=k_before_rope)
    roundtrip = lambda t: decode_kv(encode_kv(t, bits=4, group_size=group, clip=clip), dtype=t.dtype)
    expected = reference_logits(model, IDS, roundtrip, k_before_rope)
    plain = logits(model)
    got = logits(apply_kv_quant(model, qcfg))
    assert rel_err(got, expected) < 1e-4
    assert rel_err(got, plain) > 1e-3  # the quantization really happened


def test_fake_quant_equals_packed_kv_format():
    x = torch.randn(2, 3, 7, 64) * torch.linspace(0.1, 4, 64)
    for group in (0, 16, 32):
        kvq = KVFakeQuant(4, group, 0.95, True, 64, "sdpa")
        packed = decode_kv(encode_kv(x, bits=4, group_size=group, clip=0.95))
        assert torch.equal(kvq(x), packed)


def test_kv_bits_control_the_error(model):
    plain = logits(model)
    errors = {bits: rel_err(logits(apply_kv_quant(model, QuantConfig(kv_bits=bits))), plain)
              for bits in (8, 4, 2)}
    assert errors[8] < 0.01
    assert errors[2] > 0.1
    assert errors[8] < errors[4] < errors[2]


@pytest.mark.parametrize("k_before_rope", [True, False])
def test_decode_with_cache_matches_full_forward(model, k_before_rope):
    apply_kv_quant(model, QuantConfig(kv_bits=4, k_before_rope=k_before_rope))
    full = logits(model)
    with torch.no_grad():
        out = model(IDS[:, :16], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(16, IDS.shape[1]):
            out = model(IDS[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            steps.append(out.logits)
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-4


def test_eager_and_sdpa_give_the_same_quantized_model(model):
    qcfg = QuantConfig(kv_bits=4, k_before_rope=False)
    sdpa = logits(apply_kv_quant(model, qcfg))
    eager_model = tiny_random_llama(seed=4, attn_implementation="eager")
    assert rel_err(logits(apply_kv_quant(eager_model, qcfg)), sdpa) < 1e-4


def test_k_quant_follows_replaced_k_proj_and_deepcopy(model):
    quantized = logits(apply_kv_quant(model, QuantConfig(kv_bits=4, k_before_rope=True)))
    for layer in decoder_layers(model):
        layer.self_attn.k_proj = StandInQuantLinear(layer.self_attn.k_proj)
    assert rel_err(logits(model), quantized) < 1e-5
    assert rel_err(logits(copy.deepcopy(model)), quantized) < 1e-5
    assert rel_err(logits(model), quantized) < 1e-5


def test_remove_and_reapply(model):
    plain = logits(model)
    apply_kv_quant(model, {"kv_bits": 3})
    assert len(kv_quant_modules(model)) == 2
    assert model.config._attn_implementation == "atom_kv_sdpa"
    apply_kv_quant(model, {"kv_bits": 16})  # 16 = off
    assert kv_quant_modules(model) == {} and model.config._attn_implementation == "sdpa"
    assert torch.equal(logits(model), plain)
    apply_kv_quant(model, {"kv_bits": 4})
    once = logits(model)
    apply_kv_quant(model, {"kv_bits": 4})  # re-applying does not quantize twice
    assert torch.equal(logits(model), once)
    remove_kv_quant(model)
    assert torch.equal(logits(model), plain)
    for layer in decoder_layers(model):  # no hooks left behind
        assert not layer.self_attn._forward_pre_hooks and not layer.self_attn.k_proj._forward_hooks


def test_bad_kv_config_names_key(model):
    with pytest.raises(ConfigError, match="kv_group_size"):
        apply_kv_quant(model, QuantConfig(kv_bits=4, kv_group_size=5))  # head_dim 16
    with pytest.raises(ConfigError, match="kv_bits"):
        apply_kv_quant(model, {"kv_bits": 1})
