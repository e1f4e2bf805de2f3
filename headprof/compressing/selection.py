"""Which prompt positions each KV head keeps: the selection a compressed cache holds, read out for inspection.

A compressed cache stores keys and values, not where they came from (positions live only on sliding layers).
To see why an answer was lost (did the heads that copy a UUID keep its tokens?), `kept_positions` runs the same
selection the cache runs at prefill (`Plan.select` on the attention rows of the observation window, as
`generation.generate` from a shared prefill does) and returns it as host arrays, one per [layer][KV head].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from headprof import methods
from headprof.compressing.compress import compressed_layers, make_plan
from headprof.compressing.generation import Prefill, prefill
from headprof.errors import HeadprofError
from headprof.models import LoadedModel


@dataclass
class Kept:
    """Per layer: None (the layer keeps every token: not compressed) or, per KV head, the kept prompt positions
    (sorted, the observation window included). `budgets` [layer, kv_head]: prefix tokens each head bought
    (0 on layers that keep every token)."""

    method: str
    budget: int
    prompt_ids: list[int]
    window: int
    positions: list[list[np.ndarray] | None]
    budgets: np.ndarray

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def coverage(self, span: np.ndarray | list[int]) -> np.ndarray:
        """[layer, kv_head] the share of the prompt positions `span` that each head kept (NaN: a layer that keeps
        every token; 1.0 for a head of a layer without that KV head has no meaning and reads NaN too)."""
        span = np.asarray(span, dtype=np.int64)
        if span.size == 0:
            raise HeadprofError("coverage of an empty span")
        widest = max((len(layer) for layer in self.positions if layer is not None), default=0)
        out = np.full((len(self.positions), widest), np.nan)
        for i, layer in enumerate(self.positions):
            if layer is not None:
                out[i, :len(layer)] = [np.isin(span, kept).mean() for kept in layer]
        return out

    def to_dict(self) -> dict:
        return {"method": self.method, "budget": self.budget, "prompt_tokens": self.prompt_len, "window": self.window,
                "budgets": self.budgets.tolist(),
                "positions": [None if layer is None else [k.tolist() for k in layer] for layer in self.positions]}


def kept_positions(lm: LoadedModel, prompt_ids: list[int], method: str | methods.Method, budget: int,
                   compress_sliding: bool = True, shared: Prefill | None = None) -> Kept:
    """What `method` at `budget` keeps of `prompt_ids`, per layer and KV head (from `shared`, a prefill of the same
    prompt with a window at least the method's, or a prefill of its own)."""
    m = methods.resolve(method)
    if not m.compresses:
        raise HeadprofError(f"{m.name} keeps every token: nothing to inspect")
    n, lay = len(prompt_ids), lm.info.layout
    if n <= m.window:
        raise HeadprofError(f"prompt of {n} tokens is not longer than the observation window ({m.window})")
    if shared is None:
        shared = prefill(lm, prompt_ids, m.window)
    elif shared.prompt_ids != list(prompt_ids) or shared.window < m.window:
        raise HeadprofError("the shared prefill was made for another prompt or a smaller window")
    plan = make_plan(m, lay, n, budget, compress_sliding)
    squeeze = compressed_layers(lay, m, compress_sliding)
    positions: list[list[np.ndarray] | None] = []
    for i in range(lay.num_layers):
        if not squeeze[i] or i not in shared.rows:
            positions.append(None)
            continue
        keep = plan.select(i, shared.rows[i][:, :, -m.window:])
        if len(keep) == 1 and lay.kv_heads(i) > 1:  # one MLA latent: every head reads the same kept tokens
            keep = keep * lay.kv_heads(i)
        positions.append([k.cpu().numpy() for k in keep])
    budgets = np.zeros((lay.num_layers, max(lay.kv_heads(i) for i in range(lay.num_layers))), dtype=np.int64)
    for i, layer in enumerate(positions):  # what each head bought (adaptive methods decide it per layer here)
        if layer is not None:
            budgets[i, :len(layer)] = [len(k) - m.window for k in layer]
    return Kept(m.name, budget, list(prompt_ids), m.window, positions, budgets)


def span_positions(tokenizer, prompt_ids: list[int], text: str) -> list[int]:
    """Prompt positions of the tokens that spell the last occurrence of `text`, matched on the decoded tokens'
    characters without whitespace (so a span need not be tokenized as it is in context, and tokenizers that
    decode a lone token without its space still match)."""
    pieces = ["".join(tokenizer.decode([t]).split()) for t in prompt_ids]
    starts = np.cumsum([0] + [len(p) for p in pieces])
    want = "".join(text.split())
    at = "".join(pieces).rfind(want) if want else -1
    if at < 0:
        raise HeadprofError(f"'{text[:40]}' does not occur in the prompt")
    end = at + len(want)
    return [i for i in range(len(prompt_ids)) if starts[i] < end and starts[i + 1] > at]
