"""Evaluation and calibration text: local offline copies first, Hugging Face datasets as fallback.

The data root comes from an explicit argument, else the ATOM_LAB_DATA environment variable. With
neither, loaders fall back to the usual Hugging Face dataset names (needs network access).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from atom_lab.config import ConfigError

DATA_ENV = "ATOM_LAB_DATA"

WIKITEXT2_FILES = {"test": "wikitext2/wiki.test.raw", "validation": "wikitext2/wiki.valid.raw"}


class DataError(FileNotFoundError):
    """A data file or directory that is missing; the message says where it was looked for."""


def resolve_data_root(root: str | os.PathLike | None = None) -> Path | None:
    """The configured data root (argument, else $ATOM_LAB_DATA), or None for hub fallback."""
    root = root or os.environ.get(DATA_ENV) or None
    if root is None:
        return None
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a directory; point data.root (or "
                        f"${DATA_ENV}) at the offline data folder, e.g. ../shared/data")
    return path


def data_file(root: Path, relative: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise DataError(f"missing data file {path} (data.root={root}); expected {relative} there")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_hub_dataset(*args, **kwargs):
    """datasets.load_dataset, with an unreachable hub turned into a one-line DataError."""
    from datasets import load_dataset

    try:
        return load_dataset(*args, **kwargs)
    except Exception as exc:  # ConnectionError, LocalEntryNotFoundError, DatasetNotFoundError, ...
        raise DataError(f"no data root is set and the Hugging Face dataset {args[0]!r} could not be "
                        f"loaded ({exc.__class__.__name__}); point data.root (or ${DATA_ENV}) at "
                        f"the offline data folder, e.g. data.root=../shared/data") from exc


def wikitext2_rows(split: str, root: str | os.PathLike | None = None) -> list[str]:
    """The split's dataset rows (each ending in a newline, as the HF `text` rows)."""
    if split not in WIKITEXT2_FILES:
        raise ValueError(f"wikitext2 split {split!r}: allowed {sorted(WIKITEXT2_FILES)}")
    path_root = resolve_data_root(root)
    if path_root is None:
        return list(load_hub_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    text = data_file(path_root, WIKITEXT2_FILES[split]).read_text(encoding="utf-8")
    return text.splitlines(keepends=True)


def wikitext2_text(split: str, root: str | os.PathLike | None = None) -> str:
    """GPTQ-style evaluation text: the split's rows joined with a blank line."""
    return "\n\n".join(wikitext2_rows(split, root))


def tokenize_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenise once, as GPTQ's evaluation does -> int64 [1, n_tokens]."""
    return tokenizer(text, return_tensors="pt").input_ids


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from a [1, n] token stream -> [nsamples, seqlen]."""
    n = tokens.shape[-1]
    if n <= seqlen:
        raise ConfigError(f"calib.seqlen={seqlen} is not allowed: the calibration text has only {n} "
                          f"tokens; lower calib.seqlen")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=gen)
    return torch.stack([tokens[0, s : s + seqlen] for s in starts.tolist()])
