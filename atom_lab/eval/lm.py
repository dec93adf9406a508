"""An lm-eval model wrapping an in-memory (quantized) causal LM and its tokenizer.

lm-eval's HFLM needs `accelerate`, which the CPU image does not ship; this wrapper scores requests
the way HFLM does (context/continuation split by lm-eval's TemplateLM, right padding, causal LM
without an attention mask, requests sorted by length, continuation log-probabilities summed) and
runs the model exactly as the rest of atom-lab does, fake-quant or kernel backend.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm


class InMemoryLM(TemplateLM):
    """Loglikelihood scoring (multiple-choice tasks) for a model already in memory."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        config_max = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or config_max)

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _score_batch(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """batch of (context tokens, continuation tokens) -> (sum log p(continuation), greedy?)."""
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for ctx, cont in batch]
        width = max(len(x) for x in inputs)
        pad = self.eot_token_id
        ids = torch.tensor([x + [pad] * (width - len(x)) for x in inputs], device=self.device)
        # the logits at positions len(inp)-len(cont) .. len(inp)-1 predict the continuation;
        # only the last `keep` positions are projected to the vocabulary (batches are sorted by
        # length, so the continuations of one batch sit near its end)
        first = min(len(inp) - len(cont) for inp, (_, cont) in zip(inputs, batch))
        keep = width - first
        with torch.no_grad():
            logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        results = []
        for row, (inp, (_, cont)) in enumerate(zip(inputs, batch)):
            start = len(inp) - len(cont) - first
            span = F.log_softmax(logits[row, start : start + len(cont)].float(), dim=-1)
            target = torch.tensor(cont, device=span.device)
            greedy = bool((span.argmax(-1) == target).all())
            results.append((float(span.gather(-1, target[:, None]).sum()), greedy))
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        order = sorted(range(len(requests)),
                       key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood",
                          unit="batch", disable=disable_tqdm):
            chunk = order[start : start + self.batch_size]
            scored = self._score_batch([(requests[i][1], requests[i][2]) for i in chunk])
            for i, result in zip(chunk, scored):
                results[i] = result
                if self.cache_hook is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("atom-lab's zero-shot wrapper scores multiple-choice tasks only; "
                                  "use eval.perplexity for rolling log-likelihood")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError("atom-lab's zero-shot wrapper scores multiple-choice tasks only "
                                  "(no generation tasks)")
