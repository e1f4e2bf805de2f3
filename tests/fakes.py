"""A LoadedModel around a tiny random model, with a tokenizer that needs no files."""

from __future__ import annotations

from tiny import model

from headprof import capture
from headprof.models import LoadedModel, ModelInfo


class WordTokenizer:
    """Token i <-> word 'w{i}'; enough for scoring, which only decodes generated tokens."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{i}" for i in ids)


def loaded(arch: str, seed: int = 0, **overrides) -> LoadedModel:
    m = model(arch, seed, **overrides)
    m.generation_config.eos_token_id = None
    impl = capture.attach(m)
    info = ModelInfo(spec=f"tiny-{arch}", resolved=f"tiny-{arch}", revision=None, weights_sha256=None,
                     architecture=type(m).__name__, model_type=m.config.model_type,
                     layout=capture.layout(m), max_positions=512, chat_template=False)
    return LoadedModel(model=m, tokenizer=WordTokenizer(), info=info, device="cpu", dtype="float32",
                       attn_implementation=impl)


def flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=None, cache_leftpad=None, softmax_scale=None,
                            causal=False, softcap=0.0, **unused):
    """flash-attn's documented semantics, computed naively: batch entry b reads keys [cache_leftpad[b],
    cache_seqlens[b]) of its cache, causal aligned to the bottom right, query heads grouped over KV heads,
    logits soft-capped when softcap > 0. Lets the CPU tests check how headprof calls the kernel."""
    import torch

    assert not unused, unused
    batch, q_len, heads, d = q.shape
    heads_k = k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(batch):
        first, end = int(cache_leftpad[b]), int(cache_seqlens[b])
        k, v = k_cache[b, first:end], v_cache[b, first:end]  # (n, heads_k, d)
        for h in range(heads):
            kh, vh = k[:, h // (heads // heads_k)], v[:, h // (heads // heads_k)]
            logits = (q[b, :, h] @ kh.T) * (softmax_scale or d ** -0.5)
            if softcap:
                logits = torch.tanh(logits / softcap) * softcap
            if causal:
                n = kh.shape[0]
                allowed = torch.arange(n)[None, :] <= torch.arange(n - q_len, n)[:, None]
                logits = logits.masked_fill(~allowed, float("-inf"))
            out[b, :, h] = torch.softmax(logits, -1) @ vh
    return out
