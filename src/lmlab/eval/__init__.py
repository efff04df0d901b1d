"""Evaluation (loss, perplexity, bits per char) and sampling."""
