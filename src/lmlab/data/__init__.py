"""Text in, token arrays out: normalisation, tokenizers, windows and batches."""
