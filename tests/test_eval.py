"""GPTQ-style perplexity: equals a direct computation, batching-invariant, ptb/c4 local loaders."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from atom_lab.data import DataError
from atom_lab.errors import HarnessError
from atom_lab.eval import perplexity as ppl_mod
from atom_lab.eval.perplexity import (C4_DOCUMENTS, C4_WINDOWS, eval_text, eval_tokens,
                                      evaluate_perplexity, perplexity, window_nlls)
from atom_lab.models import tiny_random_llama


class ConstantLogits(nn.Module):
    """A model predicting the uniform distribution: its perplexity is exactly the vocab size."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.anchor)


class CharTokenizer:
    """One token per character (code point mod 256): enough to test the text -> token plumbing."""

    def __call__(self, text, return_tensors="pt"):
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % 256 for c in text]]))


@pytest.fixture(scope="module")
def tiny():
    return tiny_random_llama(seed=0)


def direct_perplexity(model, tokens, seqlen, n_windows):
    """Reference: per-window mean NLL via log_softmax + gather, mean over windows, exp."""
    nlls = []
    for i in range(n_windows):
        window = tokens[:, i * seqlen : (i + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=window).logits[0, :-1].double(), -1)
        nlls.append(-logp.gather(-1, window[0, 1:, None]).mean())
    return math.exp(torch.stack(nlls).mean().item())


def test_uniform_model_perplexity_is_vocab_size():
    tokens = torch.randint(0, 97, (1, 1000))
    result = perplexity(ConstantLogits(97), tokens, seqlen=100, progress=False)
    assert result["ppl"] == pytest.approx(97, rel=1e-5)
    assert result["windows"] == 10 and result["tokens"] == 1000


def test_perplexity_matches_direct_computation_and_batching(tiny):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 64 * 5 + 17), generator=gen)
    expected = direct_perplexity(tiny, tokens, 64, 5)
    for batch_size in (1, 2, 5):
        got = perplexity(tiny, tokens, seqlen=64, batch_size=batch_size, progress=False)
        assert got["ppl"] == pytest.approx(expected, rel=1e-4)
        assert got["windows"] == 5 and got["tokens"] == 320  # the 17-token tail is dropped


def test_max_windows_uses_the_first_windows(tiny):
    tokens = torch.randint(0, tiny.config.vocab_size, (1, 64 * 6))
    all_nlls = window_nlls(tiny, tokens, 64, progress=False)
    first = perplexity(tiny, tokens, seqlen=64, max_windows=2, progress=False)
    assert first["windows"] == 2
    assert first["nll"] == pytest.approx(all_nlls[:2].mean().item(), rel=1e-6)


def test_seqlen_longer_than_text_is_a_clear_error(tiny):
    with pytest.raises(HarnessError, match="eval.seqlen=512"):
        perplexity(tiny, torch.zeros(1, 100, dtype=torch.long), seqlen=512, progress=False)


def test_ptb_local_file_rows_joined_gptq_style(tmp_path):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text(" the cat sat\n a dog ran\n")
    assert eval_text("ptb", tmp_path, "test") == " the cat sat\n\n a dog ran"
    with pytest.raises(DataError, match="ptb.validation.txt"):
        eval_text("ptb", tmp_path, "validation")


@pytest.mark.parametrize("name,as_list", [("c4-validation.jsonl", False), ("c4-validation.json", True)])
def test_c4_local_first_documents_and_window_cap(tmp_path, name, as_list):
    (tmp_path / "c4").mkdir()
    docs = [{"text": f"d{i}", "timestamp": "x"} for i in range(C4_DOCUMENTS + 5)]
    body = json.dumps(docs) if as_list else "\n".join(json.dumps(d) for d in docs)
    (tmp_path / "c4" / name).write_text(body)
    text = eval_text("c4", tmp_path)
    assert text.startswith("d0 d1 d2") and text.endswith(f"d{C4_DOCUMENTS - 1}")
    tokens = eval_tokens(CharTokenizer(), "c4", tmp_path, "test", seqlen=4)
    assert tokens.shape[-1] == C4_WINDOWS * 4  # GPTQ keeps 256 windows of C4


def test_missing_c4_and_unknown_dataset(tmp_path):
    with pytest.raises(DataError, match="c4-validation.jsonl"):
        eval_text("c4", tmp_path)
    with pytest.raises(HarnessError, match="eval.perplexity contains 'wiki'"):
        eval_text("wiki", tmp_path)


def test_evaluate_perplexity_reports_file_hashes(tmp_path, monkeypatch):
    (tmp_path / "ptb").mkdir()
    (tmp_path / "ptb" / "ptb.test.txt").write_text("abcdefgh\n" * 50)
    result = evaluate_perplexity(ConstantLogits(256), CharTokenizer(), ["ptb"], tmp_path,
                                 seqlen=32, progress=False)["ptb"]
    assert result["ppl"] == pytest.approx(256, rel=1e-5)
    (path, digest), = result["files"].items()
    assert path.endswith("ptb.test.txt") and len(digest) == 64


def test_wikitext2_test_text_is_the_gptq_join(data_root):
    text = eval_text("wikitext2", data_root, "test")
    raw = (data_root / "wikitext2" / "wiki.test.raw").read_text(encoding="utf-8")
    assert text == "\n\n".join(raw.splitlines(keepends=True))
    assert ppl_mod.local_files("wikitext2", data_root, "test")[0].name == "wiki.test.raw"


def test_unreachable_hub_without_data_root_is_a_one_line_data_error(monkeypatch):
    import datasets

    from atom_lab.data import DataError, wikitext2_rows

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub")

    monkeypatch.delenv("ATOM_LAB_DATA", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"data\.root.*ATOM_LAB_DATA"):
        wikitext2_rows("test", None)
