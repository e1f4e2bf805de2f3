"""Compression: a method's budgets per KV head (methods/, allocate, compress), the positions each head keeps
(selection), and generation with the compressed cache (generation)."""
