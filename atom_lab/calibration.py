"""Calibration statistics of every linear input of the decoder layers.

Each decoder layer has four distinct linear inputs (LINEAR_INPUTS): the input_layernorm output
(read by q/k/v), the attention output (o_proj), the post_attention_layernorm output (gate/up) and
the SiLU(gate) * up product (down_proj). A forward pre-hook on the FIRST linear of each input
accumulates, per input channel, over all calibration tokens:
  hessian   sum of x^2 (the diagonal of the GPTQ Hessian X^T X; Atom's reorder metric)
  abs_mean  mean of |x|
  abs_max   max of |x|
Results are float32 CPU tensors, cached on disk (torch.save) under a key derived from the model
id, the data file hash, N, L, the seed, the windows themselves and a fingerprint of the weights,
so another checkpoint under the same name does not reuse stale statistics (the fingerprint hashes
an evenly strided sample of every tensor: an edit of a few isolated weights can go unnoticed).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from atom_lab.config import CalibConfig, ConfigError
from atom_lab.data import (WIKITEXT2_FILES, calibration_windows, data_file, file_sha256,
                           resolve_data_root, tokenize_text, wikitext2_text)
from atom_lab.models import decoder_layers

LINEAR_INPUTS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
METRICS = ("hessian", "abs_mean", "abs_max")
DEFAULT_CACHE_DIR = Path("~/.cache/atom_lab/calib")
CALIB_DATASETS = ("wikitext2",)
STATS_FORMAT_VERSION = 1

Stats = dict[int, dict[str, dict[str, torch.Tensor]]]


class _ChannelStats:
    """Running per-channel sums of one linear input (float64 sums, so 10^6 tokens lose nothing)."""

    def __init__(self):
        self.sum_sq = self.sum_abs = self.max_abs = None
        self.tokens = 0

    def update(self, x: torch.Tensor):
        x = x.detach().reshape(-1, x.shape[-1])
        sq = x.double().square().sum(0)
        absx = x.abs()
        total, peak = absx.double().sum(0), absx.amax(0).float()
        if self.sum_sq is None:
            self.sum_sq, self.sum_abs, self.max_abs = sq, total, peak
        else:
            self.sum_sq += sq
            self.sum_abs += total
            torch.maximum(self.max_abs, peak, out=self.max_abs)
        self.tokens += x.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        return {"hessian": self.sum_sq.float().cpu(),
                "abs_mean": (self.sum_abs / self.tokens).float().cpu(),
                "abs_max": self.max_abs.float().cpu()}


def calibration_cache_key(model_id: str, data_hash: str, nsamples: int, seqlen: int, seed: int) -> str:
    """A file-name-safe key naming the model and hashing (model, data, N, L, seed)."""
    digest = hashlib.sha256(f"{model_id}|{data_hash}|{nsamples}|{seqlen}|{seed}".encode()).hexdigest()
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(model_id))[:48]
    return f"{label}-n{nsamples}-l{seqlen}-s{seed}-{digest[:16]}"


FINGERPRINT_SAMPLES = 4096  # elements hashed per parameter: cheap even for 7B models


@torch.no_grad()
def weights_fingerprint(model) -> str:
    """sha256 over every parameter's name, shape, dtype and an evenly strided sample of values."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step].float().cpu().numpy().tobytes()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode() + sample)
    return h.hexdigest()


def _cache_file(cache_key: str, windows: torch.Tensor, model, cache_dir) -> Path:
    layers = decoder_layers(model)
    meta = {"key": cache_key, "version": STATS_FORMAT_VERSION, "layers": len(layers),
            "hidden": model.config.hidden_size, "ffn": model.config.intermediate_size,
            "dtype": str(next(model.parameters()).dtype), "weights": weights_fingerprint(model),
            "windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    return folder.expanduser() / f"{cache_key}-{digest}.pt"


def collect_input_stats(model, windows: torch.Tensor, device=None, progress: bool = True,
                        cache_key: str | None = None, cache_dir=None, batch_size: int = 4) -> Stats:
    """stats[layer][input][metric] over all tokens of `windows` [N, L] (one forward per batch).

    Runs on `device` (default: the model's; the model is moved there and back). With a
    cache_key, results are loaded from / saved to `cache_dir` (default ~/.cache/atom_lab/calib).
    """
    if windows.dim() != 2:
        raise ValueError(f"windows must be a [N, L] token tensor, got shape {tuple(windows.shape)}")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be a positive number of windows")
    path = _cache_file(cache_key, windows, model, cache_dir) if cache_key else None
    if path is not None and path.is_file():
        return torch.load(path, weights_only=True)
    home = next(model.parameters()).device
    target = torch.device(device) if device is not None else home
    model.to(target)  # statistics are gathered on `device`; the model goes back afterwards
    try:
        stats = _collect(model, windows, progress, batch_size)
    finally:
        model.to(home)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")  # one per writer: sweeps
        os.close(fd)
        torch.save(stats, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader never sees a half-written file
    return stats


def _collect(model, windows, progress, batch_size) -> Stats:
    accumulators: dict[int, dict[str, _ChannelStats]] = {}
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        accumulators[i] = {}
        for name, linears in LINEAR_INPUTS.items():
            acc = accumulators[i][name] = _ChannelStats()
            hook = _make_hook(acc)
            handles.append(layer.get_submodule(linears[0]).register_forward_pre_hook(hook))
    body = getattr(model, "model", model)  # the decoder without lm_head: no [N, L, vocab] logits
    device = body.get_input_embeddings().weight.device  # token ids go where the model is
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, windows.shape[0], batch_size), disable=not progress,
                              desc="calibration", unit="batch"):
                body(input_ids=windows[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {i: {name: acc.result() for name, acc in inputs.items()}
            for i, inputs in accumulators.items()}


def _make_hook(acc: _ChannelStats):
    def hook(module, args):
        acc.update(args[0])

    return hook


def _calib_field(calib_cfg, key):
    return calib_cfg[key] if isinstance(calib_cfg, Mapping) else getattr(calib_cfg, key)


def _as_calib_config(calib_cfg) -> CalibConfig:
    if isinstance(calib_cfg, CalibConfig):
        return calib_cfg.validate()
    keys = ("dataset", "split", "nsamples", "seqlen", "seed", "cache_dir")
    given = {k: _calib_field(calib_cfg, k) for k in keys if k in calib_cfg}
    return CalibConfig(**given).validate()


def calibration_windows_for(tokenizer, calib_cfg, data_root=None) -> torch.Tensor:
    """The calibration windows [nsamples, seqlen] of calib_cfg (wikitext2 `split`, seeded)."""
    cfg = _as_calib_config(calib_cfg)
    if cfg.dataset not in CALIB_DATASETS:
        raise ConfigError(f"calib.dataset={cfg.dataset!r} is not allowed: one of {list(CALIB_DATASETS)}")
    tokens = tokenize_text(tokenizer, wikitext2_text(cfg.split, data_root))
    return calibration_windows(tokens, cfg.nsamples, cfg.seqlen, cfg.seed)


def calibration_data_hash(calib_cfg, data_root=None) -> str:
    """sha256 of the local calibration file, or the hub dataset name when reading from the hub."""
    cfg = _as_calib_config(calib_cfg)
    root = resolve_data_root(data_root)
    if root is None:
        return f"hub:wikitext-2-raw-v1:{cfg.split}"
    return file_sha256(data_file(root, WIKITEXT2_FILES[cfg.split]))


def calibrate(model, tokenizer, calib_cfg, model_id: str, data_root=None, device=None,
              progress: bool = True, batch_size: int = 4) -> Stats:
    """Windows from calib_cfg, then collect_input_stats with the on-disk cache keyed by all inputs."""
    cfg = _as_calib_config(calib_cfg)
    windows = calibration_windows_for(tokenizer, cfg, data_root)
    key = calibration_cache_key(model_id, calibration_data_hash(cfg, data_root), cfg.nsamples,
                                cfg.seqlen, cfg.seed)
    return collect_input_stats(model, windows, device=device, progress=progress, cache_key=key,
                               cache_dir=cfg.cache_dir, batch_size=batch_size)
