"""Evaluators: GPTQ-style perplexity (perplexity.py) and lm-eval zero-shot (zeroshot.py, lm.py)."""
