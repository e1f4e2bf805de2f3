"""The slow, obvious implementation of the head scores, kept as evidence for the fast one.

It does what the reference scripts do: eager attention with `output_attentions=True` at every decode
step (full attention matrices for every layer) and Python loops over layers and heads. Tests check
that `scoring.score_probe` gives the same scores; `benchmarks/bench_score.py` times both.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from headprof.capture import implementation
from headprof.models import with_cache
from headprof.scoring import answer_done, stop_token_ids


@torch.no_grad()
def naive_score_probe(lm, input_ids: list[int], span: tuple[int, int], method: str,
                      margin: int, forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(generated tokens, [layer, head] scores) computed the naive way; with `forced`, the gold tokens
    are fed (teacher forcing) and the generated tokens are the greedy predictions at each step."""
    start, end = span
    n = end - start
    layout = lm.info.layout
    result = np.zeros((layout.num_layers, layout.num_query_heads))
    tokens = list(input_ids)
    stops = stop_token_ids(lm)
    generated: list[int] = []
    with implementation(lm.model, "eager"):
        cache = DynamicCache()
        ids = torch.tensor([input_ids], device=lm.model.device)
        lm.model(ids[:, :-1], **with_cache(lm.model, cache), use_cache=True)
        step_input = ids[:, -1:]
        for step in range(len(forced) if forced is not None else n + margin):
            out = lm.model(step_input, **with_cache(lm.model, cache), use_cache=True, output_attentions=True)
            token = int(out.logits[0, -1].argmax())
            if forced is not None:
                generated.append(token)
                token = forced[step]
            for layer in range(layout.num_layers):
                for head in range(layout.num_query_heads):
                    row = out.attentions[layer][0, head, -1].float()
                    values, idx = row.topk(1 if method == "retrieval" else n)
                    for v, i in zip(values.tolist(), idx.tolist(), strict=True):
                        if start <= i < end and (method == "r2" or tokens[i] == token):
                            result[layer, head] += (v if method == "r2" else 1.0) / n
            if forced is None and answer_done(lm.tokenizer, token, generated, stops):
                break
            tokens.append(token)
            step_input = torch.tensor([[token]], device=lm.model.device)
    return generated, result


def per_head_attention(layer, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """Attention over a compressed layer one KV head at a time (what `attention.attend` batches).

    query (1, query_heads, q, dim) -> (1, q, query_heads, dim). The q new tokens are the last q tail
    entries; they attend causally among themselves, and on a sliding-window layer only to keys whose
    position is inside the window.
    """
    _, heads, q, _ = query.shape
    kv_heads = len(layer.lens)
    group = heads // kv_heads
    out = query.new_empty(1, q, heads, layer.v.shape[-1])
    qpos = torch.arange(layer.seen - q, layer.seen, device=query.device)
    for h in range(kv_heads):
        k, v, pos = layer.head_kv(h)
        n = k.shape[0]
        logits = torch.matmul(query[0, h * group:(h + 1) * group].float(), k.float().T) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        allowed = torch.arange(n, device=k.device)[None, :] <= torch.arange(n - q, n, device=k.device)[:, None]
        if layer.sliding_window is not None:
            allowed &= pos[None, :] > qpos[:, None] - layer.sliding_window
        logits = logits.masked_fill(~allowed, float("-inf"))
        o = torch.matmul(torch.softmax(logits, dim=-1), v.float()).to(query.dtype)
        out[0, :, h * group:(h + 1) * group] = o.transpose(0, 1)
    return out
