"""Attention modules that compute attention in a method of their own, not through transformers' attention
interface: GPT-Neo and GPT-NeoX-Japanese call `self._attn(query, key, value, attention_mask)` right after their cache
update. `adapt` routes that call, on each module instance, to the attention function registered for the model's
implementation (headprof's, `capture.py`), with the module's own scaling and window, so these layers are seen,
scored and compressed like any other. Under any other implementation (eager, for checks) the module's own method
runs. Nothing of the modelling code is copied; models whose attention is written inline (Bloom, Falcon, MPT) stay
refused by `capture.verify`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

# attention class -> (module, config) -> (scaling, attention window or None)
ADAPTERS: dict[str, Callable[[torch.nn.Module, object], tuple[float, int | None]]] = {
    # GPT-Neo: unscaled logits; its "local" layers attend to the last `window_size` tokens of a cache that keeps all
    "GPTNeoSelfAttention": lambda m, c: (1.0, c.window_size if m.attention_type == "local" else None),
    "GPTNeoXJapaneseAttention": lambda m, c: (1.0 / m.norm_factor, None),
}


def adapt(model: torch.nn.Module, implementations: tuple[str, ...]) -> int:
    """Route the own-method attention of `model`'s modules through `implementations` when the model runs one of
    them; returns how many modules it routes (0 for a model that needs none). Idempotent."""
    count = 0
    for module in model.modules():
        spec = ADAPTERS.get(type(module).__name__)
        if spec is None:
            continue
        count += 1
        if getattr(module, "_headprof_own_attn", None) is None:
            scaling, window = spec(module, model.config)
            module._headprof_own_attn = module._attn
            module._attn = _routed(module, model.config, scaling, window, implementations)
    return count


def _routed(module, config, scaling: float, window: int | None, implementations: tuple[str, ...]):
    def _attn(query, key, value, attention_mask=None):
        name = config._attn_implementation
        if name not in implementations:
            return module._headprof_own_attn(query, key, value, attention_mask)
        if window is not None and (attention_mask is None or attention_mask.dim() == 4):
            attention_mask = band(attention_mask, query.shape[2], key.shape[2], window, key.device)
        out, _ = ALL_ATTENTION_FUNCTIONS[name](module, query, key, value, attention_mask,
                                                scaling=scaling, dropout=0.0, sliding_window=window)
        return out.transpose(1, 2), None  # the module merges heads from (batch, heads, q, dim)

    return _attn


def band(mask: torch.Tensor | None, q_len: int, k_len: int, window: int, device) -> torch.Tensor:
    """The model's 4D mask (or plain causal, for None) limited to each query's last `window` keys, as a bool
    (1, 1, q, k) or (batch, 1, q, k) mask: a layer whose window lies in its attention, not in its cache."""
    qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kpos = torch.arange(k_len, device=device)[None, :]
    allowed = ((kpos <= qpos) & (kpos > qpos - window))[None, None]
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask[..., :k_len] & allowed
    return mask[..., :k_len].masked_fill(~allowed, torch.finfo(mask.dtype).min)
