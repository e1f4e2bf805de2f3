"""Compressing: a method applied to a prompt: its budgets per KV head on the model's layers (compress), the
positions each head keeps (selection), and generation with the compressed cache (generation)."""
