"""GPTQ-style perplexity: the split tokenised once, non-overlapping windows, mean NLL over windows.

Datasets: wikitext2 (atom_lab.data), ptb and c4. Each reads a local file under the data root when
present and falls back to the Hugging Face hub copy GPTQ uses otherwise:
- ptb: `ptb/ptb.<split>.txt`, one sentence per line (hub: ptb_text_only), rows joined with "\\n\\n"
  as GPTQ's `get_ptb`.
- c4: `c4/c4-validation.jsonl` or `c4/c4-validation.json` (one `{"text": ...}` object per line, or
  a JSON list), the first 1100 documents joined with " " and cut to 256 windows, as GPTQ's `get_c4`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from atom_lab.data import (WIKITEXT2_FILES, DataError, data_file, file_sha256, load_hub_dataset,
                           resolve_data_root, tokenize_text, wikitext2_text)
from atom_lab.errors import HarnessError

PPL_DATASETS = ("wikitext2", "ptb", "c4")
C4_DOCUMENTS = 1100
C4_WINDOWS = 256
C4_FILES = ("c4/c4-validation.jsonl", "c4/c4-validation.json")


def ptb_file(root: Path, split: str) -> Path:
    return root / "ptb" / f"ptb.{split}.txt"


def ptb_text(split: str, root: Path | None) -> str:
    if root is None:
        rows = load_hub_dataset("ptb_text_only", "penn_treebank", split=split)["sentence"]
    else:
        path, = local_files("ptb", root, split)
        rows = path.read_text(encoding="utf-8").splitlines()
    return "\n\n".join(rows)


def c4_local_file(root: Path) -> Path | None:
    return next((root / name for name in C4_FILES if (root / name).is_file()), None)


def _read_c4_documents(path: Path, limit: int) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        records = json.loads(text)
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [record["text"] for record in records[:limit]]


def c4_text(root: Path | None) -> str:
    if root is None:
        shard = "en/c4-validation.00000-of-00008.json.gz"
        rows = load_hub_dataset("allenai/c4", data_files={"validation": shard}, split="validation")
        documents = rows[:C4_DOCUMENTS]["text"]
    else:
        path, = local_files("c4", root)
        documents = _read_c4_documents(path, C4_DOCUMENTS)
    return " ".join(documents)


def eval_text(dataset: str, root: Path | None, split: str = "test") -> str:
    """The evaluation text of `dataset`, joined the way GPTQ's evaluation does."""
    local_files(dataset, root, split)  # validates the name and split, checks the files
    if dataset == "wikitext2":
        return wikitext2_text(split, root)
    if dataset == "ptb":
        return ptb_text(split, root)
    return c4_text(root)


def local_files(dataset: str, root: Path | None, split: str = "test") -> list[Path]:
    """The local files `dataset` reads ([] for hub data); DataError if one is missing."""
    if dataset not in PPL_DATASETS:
        raise HarnessError(f"eval.perplexity contains {dataset!r}: allowed datasets "
                           f"{list(PPL_DATASETS)}")
    if dataset in ("wikitext2", "ptb") and split not in ("test", "validation"):
        raise HarnessError(f"eval.split={split!r} is not allowed: test or validation")
    if root is None:
        return []
    if dataset == "wikitext2":
        return [data_file(root, WIKITEXT2_FILES[split])]
    if dataset == "ptb":
        path = ptb_file(root, split)
        if not path.is_file():
            raise DataError(f"missing data file {path} (data.root={root}); eval.perplexity=ptb "
                            f"needs ptb/ptb.{split}.txt with one sentence per line")
        return [path]
    path = c4_local_file(root)
    if path is None:
        raise DataError(f"missing data file {root / C4_FILES[0]} (data.root={root}); "
                        f"eval.perplexity=c4 needs one of {list(C4_FILES)}")
    return [path]


def eval_tokens(tokenizer, dataset: str, root: Path | None, split: str, seqlen: int) -> torch.Tensor:
    tokens = tokenize_text(tokenizer, eval_text(dataset, root, split))
    if dataset == "c4":
        tokens = tokens[:, : C4_WINDOWS * seqlen]
    return tokens


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def window_nlls(model, tokens: torch.Tensor, seqlen: int, max_windows: int | None = None,
                batch_size: int = 1, progress: bool = True) -> torch.Tensor:
    """Mean next-token NLL of each non-overlapping `seqlen` window of `tokens` [1, n] -> [windows]."""
    n_windows = tokens.shape[-1] // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise HarnessError(f"eval.seqlen={seqlen} is longer than the evaluation text "
                           f"({tokens.shape[-1]} tokens): lower eval.seqlen")
    windows = tokens[0, : n_windows * seqlen].view(n_windows, seqlen)
    device = _model_device(model)
    nlls = []
    with torch.no_grad(), tqdm(total=n_windows, desc="perplexity", unit="window",
                               disable=not progress) as bar:
        for start in range(0, n_windows, batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                  batch[:, 1:].reshape(-1), reduction="none")
            nll = nll.view(batch.shape[0], -1).mean(dim=1)
            nlls.append(nll.cpu())
            bar.update(batch.shape[0])
    return torch.cat(nlls)


def perplexity(model, tokens: torch.Tensor, seqlen: int = 2048, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> dict:
    """GPTQ-style perplexity -> {ppl, nll, tokens (scored), windows}."""
    nlls = window_nlls(model, tokens, seqlen, max_windows, batch_size, progress)
    nll = nlls.mean().item()
    return {"ppl": math.exp(nll), "nll": nll, "tokens": int(nlls.numel() * seqlen),
            "windows": int(nlls.numel())}


def evaluate_perplexity(model, tokenizer, datasets, data_root=None, split: str = "test",
                        seqlen: int = 2048, max_windows: int | None = None, batch_size: int = 1,
                        progress: bool = True) -> dict[str, dict]:
    """Perplexity on each dataset -> {dataset: {ppl, nll, tokens, windows, files}}."""
    root = resolve_data_root(data_root)
    results = {}
    for dataset in datasets:
        tokens = eval_tokens(tokenizer, dataset, root, split, seqlen)
        result = perplexity(model, tokens, seqlen, max_windows, batch_size, progress)
        result["files"] = {str(p): file_sha256(p) for p in local_files(dataset, root, split)}
        results[dataset] = result
    return results
