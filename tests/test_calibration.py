import os
from pathlib import Path

import pytest
import torch

from atom_lab import calibration
from atom_lab.calibration import (LINEAR_INPUTS, calibration_cache_key, calibration_windows_for,
                                  collect_input_stats)
from atom_lab.config import CalibConfig, ConfigError
from atom_lab.models import decoder_layers, tiny_random_llama

DATA_ROOT = os.environ.get("ATOM_LAB_DATA") or str(Path(__file__).resolve().parents[2] / "shared" / "data")
needs_data = pytest.mark.skipif(not Path(DATA_ROOT, "wikitext2").is_dir(), reason=f"no data at {DATA_ROOT}")


@pytest.fixture(scope="module")
def model():
    return tiny_random_llama()


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(0))


def captured_inputs(model, windows):
    """Brute force: every input of every first linear, kept whole."""
    seen, handles = {}, []
    for i, layer in enumerate(decoder_layers(model)):
        for name, linears in LINEAR_INPUTS.items():
            def hook(mod, args, key=(i, name)):
                seen.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).clone())
            handles.append(layer.get_submodule(linears[0]).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def test_stats_match_brute_force_per_channel_reductions(model, windows):
    stats = collect_input_stats(model, windows, progress=False, batch_size=2)
    inputs = captured_inputs(model, windows)
    assert sorted(stats) == [0, 1]
    for (layer, name), x in inputs.items():
        assert x.shape[0] == windows.numel()
        s = stats[layer][name]
        torch.testing.assert_close(s["hessian"], (x.double() ** 2).sum(0).float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["abs_mean"], x.abs().mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["abs_max"], x.abs().amax(0), rtol=0, atol=0)
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in s.values())


def test_stat_shapes_follow_linear_inputs(model, windows):
    stats = collect_input_stats(model, windows, progress=False)
    for inputs in stats.values():
        assert inputs["qkv"]["hessian"].shape == (64,)
        assert inputs["gate_up"]["abs_mean"].shape == (64,)
        assert inputs["o"]["abs_max"].shape == (64,)  # 4 heads x head_dim 16
        assert inputs["down"]["hessian"].shape == (160,)


def test_batch_size_does_not_change_stats(model, windows):
    one = collect_input_stats(model, windows, progress=False, batch_size=1)
    all_ = collect_input_stats(model, windows, progress=False, batch_size=5)
    for layer in one:
        for name in LINEAR_INPUTS:
            for metric, v in one[layer][name].items():
                torch.testing.assert_close(v, all_[layer][name][metric], rtol=1e-4, atol=1e-6)


def test_disk_cache_roundtrip_and_key_separation(model, windows, tmp_path, monkeypatch):
    key = calibration_cache_key("tiny", "datahash", 5, 24, 0)
    first = collect_input_stats(model, windows, progress=False, cache_key=key, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def no_forward(*args, **kwargs):
        raise AssertionError("cache miss: the model ran again")

    monkeypatch.setattr(calibration, "_collect", no_forward)
    again = collect_input_stats(model, windows, progress=False, cache_key=key, cache_dir=tmp_path)
    assert torch.equal(again[1]["down"]["hessian"], first[1]["down"]["hessian"])
    with pytest.raises(AssertionError, match="cache miss"):  # other windows: other file
        collect_input_stats(model, windows[:3], progress=False, cache_key=key, cache_dir=tmp_path)


def test_cache_misses_when_the_weights_change(model, windows, tmp_path):
    key = calibration_cache_key("tiny", "datahash", 5, 24, 0)
    before = collect_input_stats(model, windows, progress=False, cache_key=key, cache_dir=tmp_path)
    layer0 = decoder_layers(model)[0]
    with torch.no_grad():  # same name, other checkpoint: the cached statistics are stale
        layer0.input_layernorm.weight.mul_(2.0)
    try:
        after = collect_input_stats(model, windows, progress=False, cache_key=key,
                                    cache_dir=tmp_path)
    finally:
        with torch.no_grad():
            layer0.input_layernorm.weight.div_(2.0)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    torch.testing.assert_close(after[0]["qkv"]["hessian"], 4 * before[0]["qkv"]["hessian"],
                               rtol=1e-4, atol=1e-6)


def test_cache_key_changes_with_every_field():
    base = ("smollm2", "abc", 128, 2048, 0)
    keys = {calibration_cache_key(*base)}
    for i, other in enumerate(("llama", "abd", 64, 1024, 1)):
        changed = list(base)
        changed[i] = other
        keys.add(calibration_cache_key(*changed))
    assert len(keys) == 6
    assert calibration_cache_key(*base) == calibration_cache_key(*base)
    assert "/" not in calibration_cache_key("org/model", "h", 1, 2, 3)


class CharTokenizer:
    """Stand-in tokenizer (one token per byte) so the test exercises only the windowing."""

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([list(text.encode("utf-8")[:50000])], dtype=torch.long)
        return type("Encoding", (), {"input_ids": ids})()


@needs_data
def test_calibration_windows_from_wikitext_are_seeded():
    cfg = CalibConfig(nsamples=4, seqlen=32, seed=0)
    a = calibration_windows_for(CharTokenizer(), cfg, DATA_ROOT)
    b = calibration_windows_for(CharTokenizer(), {"nsamples": 4, "seqlen": 32, "seed": 0}, DATA_ROOT)
    c = calibration_windows_for(CharTokenizer(), CalibConfig(nsamples=4, seqlen=32, seed=1), DATA_ROOT)
    assert a.shape == (4, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("cfg, key", [({"dataset": "c4"}, "calib.dataset"),
                                      ({"nsamples": 0}, "calib.nsamples")])
def test_bad_calibration_config_names_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        calibration_windows_for(CharTokenizer(), cfg, DATA_ROOT)


def test_bad_windows_rejected(model):
    with pytest.raises(ValueError, match=r"\[N, L\]"):
        collect_input_stats(model, torch.zeros(8, dtype=torch.long), progress=False)


@needs_data
def test_calibrate_end_to_end_uses_cache(model, tmp_path):
    cfg = {"nsamples": 2, "seqlen": 16, "seed": 0, "cache_dir": str(tmp_path)}
    stats = calibration.calibrate(model, CharTokenizer(), cfg, "tiny", DATA_ROOT, progress=False)
    assert stats[0]["down"]["hessian"].shape == (160,)
    (cached,) = tmp_path.glob("*.pt")
    assert cached.name.startswith("tiny-n2-l16-s0-")
