"""Attention modules that do not go through transformers' attention interface but hand their attention to one
call headprof can take over, right after their cache update:

- a method of their own, `self._attn(query, key, value, attention_mask)` (GPT-Neo, GPT-NeoX-Japanese): the method
  is replaced on the instance;
- PyTorch's `scaled_dot_product_attention`, called inline under the `sdpa` implementation (Falcon without ALiBi):
  that one call is caught while the module runs (a `TorchFunctionMode`, entered and left by module hooks).

Either way the call goes to the attention function registered for the route (headprof's, `capture.py`) with the
module's own scaling and window, so these layers are seen, scored and compressed like any other. With no route
(eager, for checks) the module's own code runs. Nothing of the modelling code is copied. transformers' switch of
implementation does nothing on these models, so `route` sets the config's implementation itself (`sdpa` under
headprof's route: the masks and code path the route expects). A module whose modelling code has moved to the
attention interface (Falcon from transformers 5.25) needs no routing; its config is still checked (ALiBi stays
refused).

Attention written inline as matmuls (Bloom, MPT, XGLM, the BERT family as decoders) has no call to take over, but
its softmax follows its cache update: `InlineRows` reads that softmax's rows while the model runs, so these layers
are scored, and hides in it the keys a compressed head dropped (`kv.inline`), so they are compressed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from headprof.errors import ModelError
from headprof.kv.cache import LAST_KEYS, PENDING_MASK, check_masked


@dataclass(frozen=True)
class Adapter:
    call: str  # "method": the module's own `_attn`; "sdpa": its inline scaled_dot_product_attention
    params: Callable[[torch.nn.Module, object], tuple[float | None, int | None]]  # -> (scaling, attention window)
    refuse: Callable[[object], str | None] = lambda config: None  # a reason this config cannot be routed


ADAPTERS: dict[str, Adapter] = {
    # GPT-Neo: unscaled logits; its "local" layers attend to the last `window_size` tokens of a cache that keeps all
    "GPTNeoSelfAttention": Adapter("method", lambda m, c: (1.0, c.window_size if m.attention_type == "local"
                                                           else None)),
    "GPTNeoXJapaneseAttention": Adapter("method", lambda m, c: (1.0 / m.norm_factor, None)),
    "FalconAttention": Adapter("sdpa", lambda m, c: (None, None), lambda c: (
        "falcon with ALiBi adds a position bias to every key; headprof's compressed heads keep other positions and "
        "cannot honour it" if getattr(c, "alibi", False) else None)),
}


def adapt(model: torch.nn.Module) -> int:
    """Prepare `model`'s modules that need routing (idempotent); how many there are (0 for most models). A config
    the adapter cannot route is refused in one line (ModelError)."""
    count = 0
    for module in model.modules():
        adapter = ADAPTERS.get(type(module).__name__)
        if adapter is None:
            continue
        reason = adapter.refuse(model.config)
        if reason:
            raise ModelError(reason)
        if _uses_interface(module):
            continue
        count += 1
        if not hasattr(module, "_headprof_route"):
            scaling, window = adapter.params(module, model.config)
            module._headprof_route = None
            if adapter.call == "method":
                module._attn = _routed_method(module, module._attn, scaling, window)
            else:
                _catch_sdpa(module, scaling)
    return count


def _uses_interface(module: torch.nn.Module) -> bool:
    """Whether the module's modelling file dispatches through transformers' attention interface (then headprof's
    registered function sees its attention directly)."""
    return hasattr(sys.modules.get(type(module).__module__), "ALL_ATTENTION_FUNCTIONS")


def route(model: torch.nn.Module, name: str | None, implementation: str) -> None:
    """Send the adapted modules' attention to the function registered as `name` (None: the module's own code) and
    set the config's implementation (what the model's masks and code paths follow) to `implementation`."""
    for module in model.modules():
        if hasattr(module, "_headprof_route"):
            module._headprof_route = name
    model.config._attn_implementation = implementation


def routed(model: torch.nn.Module) -> str | None:
    return next((m._headprof_route for m in model.modules() if hasattr(m, "_headprof_route")), None)


def _call(module, query, key, value, mask, scaling, window, is_causal=None) -> torch.Tensor:
    """The routed attention, (batch, heads, q, dim) as the module expects it back."""
    if window is not None and (mask is None or mask.dim() == 4):
        mask = band(mask, query.shape[2], key.shape[2], window, key.device)
    extra = {} if is_causal is None else {"is_causal": is_causal}
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, _ = ALL_ATTENTION_FUNCTIONS[module._headprof_route](module, query, key, value, mask, scaling=scaling,
                                                              dropout=0.0, sliding_window=window, **extra)
    return out.transpose(1, 2).contiguous()


def _routed_method(module, own, scaling: float, window: int | None):
    def _attn(query, key, value, attention_mask=None):
        if module._headprof_route is None:
            return own(query, key, value, attention_mask)
        return _call(module, query, key, value, attention_mask, scaling, window), None

    return _attn


class _SDPA(TorchFunctionMode):
    """Inside one module's forward: its `scaled_dot_product_attention` call goes to the routed function (whose own
    calls run normally: a mode is off while it handles a call)."""

    def __init__(self, module, scaling: float | None) -> None:
        super().__init__()
        self.module, self.scaling = module, scaling

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        query, key, value = args[:3]
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        scale = kwargs.get("scale", self.scaling)
        return _call(self.module, query, key, value, mask, scale, None, kwargs.get("is_causal", False) or None)


def _catch_sdpa(module, scaling: float | None) -> None:
    def enter(mod, args):
        if mod._headprof_route is not None:
            mod._headprof_mode = _SDPA(mod, scaling)
            mod._headprof_mode.__enter__()

    def leave(mod, args, output):
        mode = getattr(mod, "_headprof_mode", None)
        if mode is not None:
            mod._headprof_mode = None
            mode.__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


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


_SOFTMAX = (F.softmax, torch.softmax, torch.Tensor.softmax)


class InlineRows(TorchFunctionMode):
    """While a model with attention written inline runs: the first softmax over the last dimension after a layer's
    cache update (`kv.cache.LAST_KEYS`), over as many keys as the update returned, is that layer's attention. A
    compressed layer's mask of held keys (`kv.cache.PENDING_MASK`) is applied to its input, so each head reads its
    own kept keys; its probabilities, (batch, heads, queries, keys), go to `sink` (a (batch * heads, queries, keys)
    softmax is split by `heads(layer)`) with the forward pass's 2D `padding` mask (a left-padded batch's rows start
    after their padding). Nothing else is changed: the model computes what it always does."""

    def __init__(self, sink: Callable[[int, torch.Tensor, torch.Tensor | None], None], heads: Callable[[int], int],
                 layers: frozenset[int], padding: torch.Tensor | None = None) -> None:
        super().__init__()
        self.sink, self.heads, self.layers, self.padding = sink, heads, layers, padding

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        last = LAST_KEYS.get()
        if func not in _SOFTMAX or last is None or last[0] not in self.layers or not args:
            return func(*args, **kwargs)
        scores = args[0]
        dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
        if not (isinstance(scores, torch.Tensor) and scores.dim() in (3, 4) and dim in (-1, scores.dim() - 1)
                and scores.shape[-1] == last[1]):
            return func(*args, **kwargs)
        LAST_KEYS.set(None)  # one softmax per update: a later one (a router, a second stream) is not it
        layer = last[0]
        pending = PENDING_MASK.get()
        if pending is not None and pending[0] == layer:
            PENDING_MASK.set(None)
            args = (hide(scores, pending[1]), *args[1:])
        out = func(*args, **kwargs)
        self.sink(layer, out if out.dim() == 4 else out.reshape(-1, self.heads(layer), *out.shape[-2:]), self.padding)
        return out


def hide(scores: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
    """Attention logits (batch, heads, q, keys) or (batch * heads, q, keys) with the keys a head does not hold
    (`held`: (batch, KV heads, keys) bool) at the dtype's lowest value; each KV head's query heads share its keys."""
    batch, kv_heads, keys = held.shape
    rows = scores.numel() // (scores.shape[-2] * keys)
    if rows % (batch * kv_heads):
        raise ModelError(f"an inline softmax over {rows} rows of keys cannot be matched to {batch} x {kv_heads} "
                         "compressed KV heads")
    allowed = held.repeat_interleave(rows // (batch * kv_heads), dim=1).reshape(
        *scores.shape[:-2], 1, keys)
    return scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)


def read_inline(model: torch.nn.Module, sink: Callable[[int, torch.Tensor, torch.Tensor | None], None],
                heads: Callable[[int], int], layers: frozenset[int], active: Callable[[], bool]) -> None:
    """Read the inline attention of `model`'s `layers` with `InlineRows` during every forward pass for which
    `active()` holds (idempotent)."""
    if getattr(model, "_headprof_inline", False):
        return
    model._headprof_inline = True

    def enter(mod, args, kwargs):
        LAST_KEYS.set(None)  # an update of another forward pass (another model) is no layer of this one
        if active():
            padding = kwargs.get("attention_mask")
            mod._headprof_rows = InlineRows(sink, heads, layers, padding if padding is None or padding.dim() == 2
                                            else None)
            mod._headprof_rows.__enter__()

    def leave(mod, args, kwargs, output):
        mode = getattr(mod, "_headprof_rows", None)
        if mode is not None:
            mod._headprof_rows = None
            mode.__exit__(None, None, None)
        if output is not None:  # (None: the forward pass raised, and that error is the one to see)
            check_masked()  # the last layer's softmax took its mask too
        else:
            PENDING_MASK.set(None)

    model.register_forward_pre_hook(enter, with_kwargs=True)
    model.register_forward_hook(leave, with_kwargs=True, always_call=True)
