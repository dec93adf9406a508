"""quantize_model on a tiny random Llama (GQA) with injected activation outlier channels."""
import functools

import pytest
import torch

from atom_lab.config import ConfigError, QuantConfig
from atom_lab.formats import decode_mixed
from atom_lab.models import decoder_layers, tiny_random_llama
from atom_lab.qlinear import QuantLinear
from atom_lab.quantize import _input_hessian, capture_layer_inputs, install_quant_linears, quantize_model

SEEDS = (0, 1, 2)
ATOM = dict(w_bits=4, a_bits=4, outliers=8, group_size=16, a_clip=0.9, w_clip=0.85)
# tiny model: hidden 64, FFN 160 -> 56 / 152 normal channels: groups of 16 end in a partial group


def _model(seed):
    """Tiny Llama whose RMSNorm gains blow up 4 channels: real-LLM-like activation outliers."""
    model = tiny_random_llama(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in decoder_layers(model):
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[torch.randperm(64, generator=gen)[:4]] *= 15
    return model


def _tokens(n, length, seed):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


CALIB, EVAL = _tokens(8, 64, 10), _tokens(2, 48, 11)


@functools.lru_cache(maxsize=None)
def _run(seed, **cfg):
    model = _model(seed)
    with torch.no_grad():
        ref = model(EVAL).logits
    summary = quantize_model(model, QuantConfig(**cfg), CALIB, progress=False)
    with torch.no_grad():
        out = model(EVAL).logits
    return ((out - ref).norm() / ref.norm()).item(), summary, model


def _mean_err(**cfg):
    return sum(_run(seed, **cfg)[0] for seed in SEEDS) / len(SEEDS)


def test_fp16_preset_leaves_logits_unchanged():
    err, summary, model = _run(0, name="fp16")
    assert err == 0.0 and summary["linears_quantized"] == 0
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_w8a8_small_w4a4_rtn_large():
    w8a8, w4a4 = _mean_err(w_bits=8, a_bits=8), _mean_err(w_bits=4, a_bits=4)
    assert w8a8 < 0.08  # measured about 0.045
    assert w4a4 > 0.4 and w4a4 > 5 * w8a8  # measured about 0.64


def test_atom_steps_reduce_error():
    w4a4 = _mean_err(w_bits=4, a_bits=4)
    outliers_fp16 = _mean_err(w_bits=4, a_bits=4, outliers=8, outlier_bits="fp16")
    outliers_int8 = _mean_err(w_bits=4, a_bits=4, outliers=8)
    grouped = _mean_err(w_bits=4, a_bits=4, outliers=8, group_size=16)
    atom = _mean_err(**ATOM)
    atom_gptq = _mean_err(**ATOM, weight_method="gptq", w_channel_group=2)
    # measured: 0.64 -> 0.30 (fp16 outliers) ~ 0.30 (int8) -> 0.21 (group 16) ~ 0.22 (clip)
    # -> 0.17 (GPTQ); clipping does not pay on a random model, so it is not asserted
    assert outliers_fp16 < 0.6 * w4a4
    assert abs(outliers_int8 - outliers_fp16) < 0.1 * outliers_fp16
    assert grouped < 0.85 * outliers_int8
    assert atom < 0.5 * w4a4
    assert atom_gptq < 0.9 * atom


def test_summary_and_modules_of_atom_recipe():
    _, summary, model = _run(0, **ATOM, weight_method="gptq", w_channel_group=2, kv_bits=4)
    assert summary["linears_quantized"] == 2 * 7 and summary["act_quantizers"] == 2 * 4
    assert summary["packed_weights"] == 14 and summary["reordered"] and summary["kv_quant"]
    assert set(summary["time_s"]) >= {"calibration", "reorder", "weights", "kv", "total"}
    attn = decoder_layers(model)[0].self_attn
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    assert q.act_quantizer is k.act_quantizer is v.act_quantizer  # quantized once per input
    assert (q.act_quantizer.bits, q.act_quantizer.outliers, q.act_quantizer.group_size) == (4, 8, 16)
    for lin in (q, k, v, attn.o_proj):
        assert torch.equal(decode_mixed(lin.packed_weight), lin.weight)
    assert not isinstance(model.lm_head, QuantLinear)


def test_weight_only_has_no_activation_quantizers():
    _, summary, model = _run(0, w_bits=4, group_size=16, outliers=8)
    assert summary["act_quantizers"] == 0 and summary["linears_quantized"] == 14
    assert all(m.act_quantizer is None for m in model.modules() if isinstance(m, QuantLinear))


def test_static_scales_come_from_calibration():
    static_err, _, model = _run(0, w_bits=8, a_bits=8, dynamic=False, static_granularity="channel")
    dynamic_err, _, _ = _run(0, w_bits=8, a_bits=8)
    assert static_err != dynamic_err
    quant = decoder_layers(model)[0].mlp.down_proj.act_quantizer
    assert not quant.dynamic and quant.normal_scale.shape == (160,)
    # the scales cover the calibration range of the down_proj input (a_clip 1.0)
    from atom_lab.calibration import collect_input_stats

    stats = collect_input_stats(_model(0), CALIB, progress=False)
    peak = stats[0]["down"]["abs_max"]
    assert torch.allclose(quant.normal_scale.float(), (peak / 127).half().float(), rtol=1e-3)


def test_gptq_hessian_is_taken_after_the_activation_quantizer():
    model = _model(0)
    qcfg = QuantConfig(**ATOM).validate()
    install_quant_linears(model, qcfg)
    hidden, kwargs = capture_layer_inputs(model, CALIB, torch.device("cpu"), batch_size=4)
    layer = decoder_layers(model)[0]
    with torch.no_grad():
        hessian = _input_hessian(layer, layer.self_attn.q_proj, hidden, kwargs, "cpu")
        x = layer.self_attn.q_proj.act_quantizer.quantize(layer.input_layernorm(torch.cat(hidden)))
    x = x.reshape(-1, 64)
    assert torch.allclose(hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_lm_head_option_quantizes_head_but_not_embeddings():
    model = _model(0)
    embed = model.model.embed_tokens.weight.clone()
    quantize_model(model, QuantConfig(w_bits=4, a_bits=8, group_size=16, quantize_lm_head=True),
                   None, progress=False)
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head.act_quantizer.outliers == 0
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert not torch.equal(model.lm_head.weight, embed)


def test_bad_inputs_fail_before_touching_weights():
    model = _model(0)
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ConfigError, match="outliers=64"):
        quantize_model(model, QuantConfig(w_bits=4, a_bits=4, outliers=64), CALIB, progress=False)
    with pytest.raises(ConfigError, match="calib_windows"):
        quantize_model(model, QuantConfig(w_bits=4, weight_method="gptq"), None, progress=False)
    with pytest.raises(ConfigError, match="w_bits=9"):
        quantize_model(model, {"w_bits": 9}, None, progress=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, before)
    quantize_model(model, QuantConfig(w_bits=8), None, progress=False)
    with pytest.raises(ValueError, match="already"):
        quantize_model(model, QuantConfig(w_bits=8), None, progress=False)
