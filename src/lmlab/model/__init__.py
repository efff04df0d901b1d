"""Models: the from-scratch Transformer, adapters for imported ones, and the registry."""
