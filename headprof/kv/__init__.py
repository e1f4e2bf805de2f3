"""The KV cache as layer kinds behind one interface (`base.LayerKind`): the cache kinds live here, a module each.

- `cache.py`: `HeadKVCache`, the cache headprof hands a model, and the cache's accounting (held, full, ideal);
- `heads.py`: per-KV-head segments (each head its own number of kept tokens), with its hybrid variant;
  `segments.py` is their geometry and `readers/` the attention backends that read them;
- `latent.py`: an MLA latent, one selection of tokens per layer;
- `native.py`: layers left to transformers (full caches, sliding windows, Mamba and linear-attention state);
- `own_cache.py`: a model that takes only its own cache class;
- `decode_cache.py`: the reserved full cache that scoring decodes a batch of probes with.

`docs/architecture.md` says how to add a kind.
"""
