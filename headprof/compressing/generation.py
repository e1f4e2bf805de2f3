"""Greedy generation with a compressed KV cache (or the full one), measured; and compression inside a
user's own `model.generate`.

`model.generate` runs as usual with a `HeadKVCache`; an `AttentionCapture` of the last `window` prompt
queries is active during prefill, and its sink compresses each layer as soon as that layer's rows exist
(the layer's output still uses every prompt token). After the last layer the capture stops, so decoding
computes no extra rows. Bytes held are read off the cache's tensors after generation, not computed
from the plan.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, StoppingCriteria

from headprof import capture, methods
from headprof.capture import AttentionCapture
from headprof.compressing.compress import Plan, compressed_layers, make_plan
from headprof.defaults import BETA, KERNEL, WINDOW
from headprof.errors import BatchOutOfMemory, HeadprofError, ModelError, out_of_memory
from headprof.kv import native, own_cache
from headprof.kv.cache import (
    HeadKVCache,
    counts_bytes,
    full_layer_counts,
    held_bytes,
    held_entries,
    leave,
    row_entries,
    state_bytes,
)
from headprof.kv.decode_cache import alone
from headprof.layout import BLOCK_KINDS, KEPT_KINDS, barred_why, layer_list
from headprof.models import HeadLayout, LoadedModel, end_tokens, last_logits_only, with_cache


@dataclass
class RunResult:
    method: str
    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_tokens_per_s: float | None
    kv_entries: int  # tokens x KV heads held at the end
    kv_bytes: int  # bytes the cache's tensors hold at the end: keys, values, and a compressed layer's slot
    # positions and masks (cache.held_bytes)
    kv_entries_full: int  # what the uncompressed cache of this model holds for the same sequence
    kv_entries_ideal: int  # budgets + window + appended tokens (sliding layers: their window)
    kv_bytes_full: int  # the uncompressed cache's bytes, each layer at its own entry size
    kv_bytes_ideal: int
    bytes_per_entry: int | None  # None where layers' entries differ in size (head sizes, MLA latents beside heads)
    budgets: list[list[int]] | None = None
    notes: list[str] = field(default_factory=list)
    # the first decode step (first token to second), and the decode rate after it: after a long prefill the first
    # step is slower for any cache (the prefill's memory traffic evicted what decoding reads)
    first_step_s: float | None = None
    steady_tokens_per_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def entry_bytes(layout: HeadLayout, elem: int) -> int | None:
    """Bytes of one cached entry where every layer with a cache has the same entry size, else None."""
    sizes = {layout.entry_size(i) for i in range(layout.num_layers) if layout.has_heads(i)}
    return sizes.pop() * elem if len(sizes) == 1 else None


def cache_for(layout: HeadLayout, method: methods.Method, compress_sliding: bool = False,
              config=None) -> HeadKVCache:
    """An empty cache whose layers the method compresses (sliding layers stay the model's own unless
    `compress_sliding`); every other layer is the one transformers makes for the model's `config`."""
    squeeze = compressed_layers(layout, method, compress_sliding)
    windows = list(layout.layer_windows) or [layout.sliding_window if kind == "sliding_attention" else None
                                             for kind in layout.attention_kinds]
    own = native.model_layers(config) if config is not None else None
    cache = HeadKVCache(list(layout.attention_kinds), squeeze, windows, native=own, latent=layout.latent,
                        holder=method.cache_kind, sinks=layout.sinks, inline=layout.inline)
    return own_cache.adapt(cache, config) if config is not None else cache


@contextmanager
def compressing(cache: HeadKVCache, window: int, plan_for: Callable[[int], Plan]) -> Iterator[HeadKVCache]:
    """Around a prefill (or a whole `generate`): compress each layer of `cache` as soon as the rows of its
    last `window` queries exist, by the plan `plan_for(prompt_len)`, then stop capturing, so decoding
    pays nothing for it."""
    todo = set(cache.compressible())
    made: list[tuple[int, Plan]] = []  # per sequence: its left padding and its plan

    def sink(layer: int, probs: torch.Tensor) -> None:
        if layer in todo:
            probs = cache.kinds[layer].token_rows(probs)
            if not made:  # the first layer's rows tell each sequence's prompt length (a batch is left-padded)
                pads = cap.pads() if probs.shape[0] > 1 else [0]  # (the 2D mask of a batch, on any layer)
                limit = cache.row_limit()
                if limit is not None and len(pads) > limit[0]:
                    raise HeadprofError(f"batched compression of {limit[1]} layers is not supported yet: one "
                                        "prompt at a time (--batch-size 1)")
                made.extend((pad, plan_for(probs.shape[-1] - pad)) for pad in pads)
            keep = []
            for b, (pad, plan) in enumerate(made):  # each sequence: its own budgets and tokens, never padding
                keep += [k + pad for k in plan.select(layer, probs[b:b + 1, :, :, pad:])]
            cache.compress(layer, keep)
            todo.discard(layer)
        if not todo:
            cap.stop()

    with AttentionCapture(sink, last_n=window) as cap, capture.compressed(cache):
        yield cache
    unread = sorted(i for i in todo if cache.kinds[i].entries())
    if unread:  # a prefill ran, and these layers' rows never came: their "compressed" cache holds every token
        raise ModelError(f"layers {layer_list(unread)} held their prompt but headprof never saw their attention "
                         "rows, so they were not compressed; this model's attention escapes headprof")


@contextmanager
def compression(model, method: str | methods.Method = "headkv", budget: int = 128, profile=None,
                window: int = WINDOW, kernel: int = KERNEL, beta: float = BETA, group_reduce: str = "mean",
                compress_sliding: bool = True) -> Iterator[HeadKVCache]:
    """Head-level KV compression inside your own `model.generate`, on any HF causal LM, for one prompt or a
    left-padded batch (pass its `attention_mask`; each sequence gets its own budgets and tokens):

        with headprof.compression(model, "headkv", budget=128, profile=prof) as cache:
            out = model.generate(ids, cache=cache, max_new_tokens=64)

    `method`: a name or spec ("headkv:beta=1.5") with `window`, `kernel`, `beta`, `group_reduce` for the
    options it has, or a built `headprof.methods` instance (its own parameters). The model's attention is
    routed through headprof's attention function (it computes what SDPA computes). One generation per
    context: the prompt is compressed at prefill, then it decodes. (Before transformers renamed it, the
    argument was `past_key_values=cache`; `models.with_cache` picks the name.)
    """
    capture.attach(model)
    layout = capture.layout(model)
    m = methods.resolve(method, profile, window=window, kernel=kernel, beta=beta, reduction=group_reduce)
    if m.needs_profile:
        if getattr(m, "profile", None) is None:
            raise HeadprofError(f"{m.name} needs a profile (headprof.Profile.load or headprof.score)")
        if hasattr(m.profile, "check_fits"):
            m.profile.check_fits(layout)
    cache = cache_for(layout, m, compress_sliding, model.config)

    def plan_for(prompt_len: int) -> Plan:
        return make_plan(m, layout, prompt_len, budget, compress_sliding)

    with compressing(cache, m.window, plan_for):
        yield cache


class _Clock(StoppingCriteria):
    """Records when each new token exists (generate calls stopping criteria once per token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Prefill:
    """One prompt's prefill, shared by every method and budget of an eval: the first generated token,
    every layer's prompt keys and values, and the attention rows of the last `window` queries, which is all
    that any method with an observation window of at most `window` selects from (it reads the last rows of
    its own window). Building a method's cache from it equals prefilling with that cache."""

    prompt_ids: list[int]
    first: int
    layers: list  # the prefilled cache's layers: keys and values, and any state that is not KV
    rows: dict[int, torch.Tensor]
    window: int
    seconds: float


@torch.no_grad()
def prefill(lm: LoadedModel, prompt_ids: list[int], window: int = WINDOW) -> Prefill:
    """Prefill once with a full cache (every layer keeps every prompt token, sliding ones too)."""
    rows: dict[int, torch.Tensor] = {}
    cache = alone(lm.model.config)
    ids = torch.tensor([prompt_ids], device=lm.model.device)
    start = time.perf_counter()
    with AttentionCapture(lambda layer, probs: rows.__setitem__(layer, probs), last_n=window):
        out = _generate(lm, ids, cache, max_new_tokens=1)
    return Prefill(list(prompt_ids), int(out[0, -1]), list(cache.layers), rows, window, time.perf_counter() - start)


def _generate(lm: LoadedModel, ids: torch.Tensor, cache, clock: StoppingCriteria | None = None, **kw):
    ends = end_tokens(lm)
    return lm.model.generate(ids, **with_cache(lm.model, cache), do_sample=False,
                             pad_token_id=lm.tokenizer.eos_token_id, top_p=None, top_k=None, temperature=None,
                             stopping_criteria=[clock] if clock else None,
                             **({"eos_token_id": sorted(ends)} if ends else {}), **kw)


def fresh_prefill_only(layout: HeadLayout, compressing: list, specs: dict) -> bool:
    """Whether compressed runs of this model must prefill for themselves: a block layer's compressors (DeepSeek-V4)
    keep state a shared prefill's keys do not carry."""
    return any(specs[m].method_class.compresses for m in compressing) and any(
        k in BLOCK_KINDS for k in layout.attention_kinds)


def _own_prefill(layout: HeadLayout) -> None:
    if any(k in BLOCK_KINDS for k in layout.attention_kinds):
        raise HeadprofError("a DeepSeek-V4 block layer's compressors cannot continue from a shared prefill: prefill "
                            "each compressed run itself")


def _from_prefill(cache, shared: Prefill, plan: Plan | None) -> None:
    """Put the shared prompt keys into `cache` as the prefill would have, and compress like its sink."""
    if plan is not None:
        _own_prefill(plan.layout)
    for i, own in enumerate(shared.layers):
        if native.has_state(own):  # Mamba / linear-attention state: this cell's own copy of it
            native.copy_state(own, cache.layers[i])
        keys = getattr(own, "keys", None)
        if keys is None or (isinstance(keys, torch.Tensor) and keys.numel() == 0):
            continue
        cache.update(keys, own.values, i)
        native.copy_indexer(own, cache.layers[i])
        if plan is not None and cache.kinds[i].compressible:
            cache.compress(i, plan.select(i, shared.rows[i][:, :, -plan.window:]))  # the method's own window


@torch.no_grad()
def generate(lm: LoadedModel, prompt_ids: list[int], method: str | methods.Method = "snapkv", budget: int = 128,
             max_new_tokens: int = 64, min_new_tokens: int = 0, compress_sliding: bool = True,
             shared: Prefill | None = None, question_start: int | None = None) -> RunResult:
    """Generate greedily from `prompt_ids` with `method` (a built method, or a name with its defaults) at
    `budget` tokens per KV head.

    `shared`: a `prefill` of the same prompt to start from instead of prefilling again (eval runs every
    method and budget from one prefill per item; the tokens are the same as without it).

    `question_start`: kvpress's protocol (its `compress_questions=False`): the context `prompt_ids[:question_start]`
    is prefilled and compressed alone (the observation window is its last tokens, `budget` counts against it), then
    the question is read through the compressed cache and the answer decoded; `shared` is then the context's prefill.

    `compress_sliding` (default): sliding-window layers also take part in the budget, keeping their best
    tokens inside their window; False keeps their whole window as the model does (docs/run.md).
    """
    lay = lm.info.layout
    m = methods.resolve(method)
    window = m.window
    n = len(prompt_ids)
    if lm.info.max_positions and n + max_new_tokens > lm.info.max_positions:
        raise HeadprofError(f"prompt of {n} tokens + {max_new_tokens} new tokens exceeds the model's "
                            f"{lm.info.max_positions} positions")
    context = n if question_start is None else question_start
    what = "prompt" if question_start is None else "context"  # what is prefilled and compressed
    if not 0 < context <= n:
        raise HeadprofError(f"the question must start inside the prompt of {n} tokens, not at {question_start}")
    if m.compresses and context <= window:
        raise HeadprofError(f"{what} of {context} tokens is not longer than the observation window ({window})")
    notes = []
    if m.compresses:
        plan = make_plan(m, lay, context, budget, compress_sliding)
        if budget >= context:
            notes.append(f"budget {budget} >= {what} length {context}: every prompt token is kept")
        cache = cache_for(lay, m, compress_sliding, lm.model.config)
    else:
        cache = own_cache.adapt(DynamicCache(config=lm.model.config), lm.model.config)
    ids = torch.tensor([prompt_ids], device=lm.model.device)
    clock = _Clock()
    kwargs = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens)
    start = time.perf_counter()
    if question_start is not None and shared is None:  # kvpress's protocol: the context alone, compressed
        shared = prefill(lm, prompt_ids[:context], window)
        start = time.perf_counter()
    if shared is not None:
        if shared.prompt_ids != list(prompt_ids[:context]) or (m.compresses and shared.window < window):
            raise ValueError(f"the shared prefill was made for another {what} or a smaller window")
        _from_prefill(cache, shared, plan if m.compresses else None)
        start -= shared.seconds  # the prefill's time counts as if it were this run's own
        reading = capture.compressed(cache) if m.compresses else contextlib.nullcontext()
        if question_start is not None:
            with reading:  # generate reads the question past the cached context
                out = _generate(lm, ids, cache, clock, **kwargs)
        else:  # continue from the shared prefill: its first token, then decode with this cache
            clock.times.append(time.perf_counter())
            out = torch.tensor([[*prompt_ids, shared.first]], device=lm.model.device)
            if max_new_tokens > 1 and shared.first not in end_tokens(lm):
                with reading:
                    out = _generate(lm, out, cache, clock, max_new_tokens=max_new_tokens - 1,
                                    min_new_tokens=max(min_new_tokens - 1, 0))
    elif m.compresses:
        with compressing(cache, window, lambda _: plan):  # made before prefill: errors come first
            out = _generate(lm, ids, cache, clock, **kwargs)
    else:
        out = _generate(lm, ids, cache, clock, **kwargs)
    tokens = out[0, n:].tolist()
    appended = max(len(tokens) - 1, 0)  # the last token is produced but never fed back
    after = n - context + appended  # tokens each compressed head took in after compression
    prefill_s = clock.times[0] - start if clock.times else time.perf_counter() - start
    times = clock.times
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
    first_step = times[1] - times[0] if len(times) > 1 else None
    steady = (len(times) - 2) / (times[-1] - times[1]) if len(times) > 2 else None
    budgets = None
    entries, nbytes = held_entries(cache), held_bytes(cache)
    full = full_layer_counts(lay, n + appended)
    ideal = cache.ideal_counts(lay, n + appended, after) if m.compresses else full
    if m.compresses:  # what each head kept of the prompt beyond the window (adaptive methods decide it at prefill)
        budgets = cache.kept_counts(lay, window)
        kept = [i for i, k in enumerate(lay.attention_kinds) if k in KEPT_KINDS]
        if kept:
            notes.append(f"layers {layer_list(kept)} attend within chunks of {lay.layer_windows[kept[0]]} tokens: "
                         "kept as the model keeps them (one chunk at most), not compressed")
        if lay.barred:
            notes.append(f"kept as the model keeps them, not compressed: {barred_why(lay)}")
        if lay.latent:
            notes.append(f"the heads of layers {layer_list(list(lay.latent))} read one MLA latent: they share their "
                         "kept tokens")
    elem = torch.finfo(lm.model.dtype).bits // 8
    label = method if isinstance(method, str) else m.name
    return RunResult(method=label, text=lm.tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                     tokens=tokens, prompt_tokens=n, prefill_s=prefill_s, decode_tokens_per_s=decode,
                     kv_entries=entries, kv_bytes=nbytes, kv_entries_full=sum(full), kv_entries_ideal=sum(ideal),
                     kv_bytes_full=counts_bytes(lay, full, elem) + state_bytes(cache),
                     kv_bytes_ideal=counts_bytes(lay, ideal, elem) + state_bytes(cache),
                     bytes_per_entry=entry_bytes(lay, elem),
                     budgets=budgets, notes=notes,
                     first_step_s=first_step, steady_tokens_per_s=steady)


@torch.no_grad()
def generate_batch(lm: LoadedModel, prompts: list[list[int]], method: str | methods.Method = "snapkv",
                   budget: int = 128, max_new_tokens: int = 64, compress_sliding: bool = True,
                   min_new_tokens: int = 0) -> list[RunResult]:
    """`generate` for several prompts at once: left-padded into one batch, one cache whose compressed layers hold a
    segment per sequence and KV head (each sequence its own budgets, from its own prompt length and observation
    window; padding is never kept), one attention call per layer for the whole batch, greedy. A sequence that ends
    leaves the batch at once (its segments and rows are dropped: it stops costing). Each prompt gets the tokens it
    gets alone. A report per prompt, made when it ends: its KV entries are its own segments and rows, its bytes its
    share of the batch's by entries at that moment."""
    if len(prompts) == 1:
        return [generate(lm, prompts[0], method, budget, max_new_tokens, min_new_tokens,
                         compress_sliding=compress_sliding)]
    lay = lm.info.layout
    m = methods.resolve(method)
    longest = max(len(p) for p in prompts)
    if lm.info.max_positions and longest + max_new_tokens > lm.info.max_positions:
        raise HeadprofError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the model's "
                            f"{lm.info.max_positions} positions")
    if m.compresses and min(len(p) for p in prompts) <= m.window:
        raise HeadprofError(f"a prompt of {min(len(p) for p in prompts)} tokens is not longer than the observation "
                            f"window ({m.window})")
    plans = {n: make_plan(m, lay, n, budget, compress_sliding) for n in {len(p) for p in prompts}} \
        if m.compresses else {}  # made before prefill: errors come first
    device = lm.model.device
    ids = torch.tensor([[0] * (longest - len(p)) + list(p) for p in prompts], device=device)  # padding: masked
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = cache_for(lay, m, compress_sliding, lm.model.config) if m.compresses else own_cache.adapt(
        DynamicCache(config=lm.model.config), lm.model.config)
    kwargs = {**with_cache(lm.model, cache), **last_logits_only(lm.model), "use_cache": True}
    runs: list[RunResult | None] = [None] * len(prompts)
    start = time.perf_counter()
    try:
        with compressing(cache, m.window, plans.__getitem__) if m.compresses else contextlib.nullcontext():
            _decode_batch(lm, lay, m, method, budget, prompts, cache, ids, mask, pos, kwargs, max_new_tokens,
                          runs, start, min_new_tokens)
    except Exception as e:
        if out_of_memory(e):  # the prompts that finished are kept; a smaller batch retries the others
            raise BatchOutOfMemory({b: r for b, r in enumerate(runs) if r is not None}, e) from e
        raise
    return runs  # type: ignore[return-value]


def _decode_batch(lm: LoadedModel, lay: HeadLayout, m: methods.Method, method, budget: int,
                  prompts: list[list[int]], cache, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                  kwargs: dict, max_new_tokens: int, runs: list, start: float, min_new_tokens: int = 0) -> None:
    """The prefill and greedy decode loop of `generate_batch`, filling `runs` as each prompt ends."""
    ends, elem = end_tokens(lm), torch.finfo(lm.model.dtype).bits // 8
    device = ids.device
    active = list(range(len(prompts)))  # which prompt each row of the batch holds
    tokens: list[list[int]] = [[] for _ in prompts]
    times: list[float] = []
    logits = lm.model(ids, attention_mask=mask, position_ids=pos, **kwargs).logits[:, -1]
    last = pos[:, -1]
    for step in range(max_new_tokens):
        if step < min_new_tokens and ends:  # no end token before the minimum, as generate's min_new_tokens
            logits[:, sorted(ends)] = float("-inf")
        token = logits.argmax(-1)
        chosen = token.tolist()  # one host read per step for the whole batch
        times.append(time.perf_counter())
        done = []
        for r, b in enumerate(active):
            tokens[b].append(chosen[r])
            if chosen[r] in ends or step + 1 == max_new_tokens:
                done.append(r)
                runs[b] = _batch_run(lm, lay, m, method, budget, len(prompts), cache, r, len(active),
                                     prompts[b], tokens[b], times[0] - start, times, elem)
        if done:
            active, rows = leave(cache, active, done, device)
            if rows is None:
                break
            token, mask, last = token[rows], mask[rows], last[rows]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], -1)
        last = last + 1
        logits = lm.model(token[:, None], attention_mask=mask, position_ids=last[:, None], **kwargs).logits[:, -1]


def _batch_run(lm: LoadedModel, lay: HeadLayout, m: methods.Method, method, budget: int, size: int, cache, r: int,
               batch: int, prompt: list[int], tokens: list[int], prefill_s: float, times: list[float],
               elem: int, question: int = 0) -> RunResult:
    """The report of the prompt in row `r` of a batch of `batch`, as it ends (before it leaves the batch);
    `question`: the prompt's last tokens, read after compression."""
    n, appended = len(prompt), max(len(tokens) - 1, 0)
    entries = [row_entries(cache, b, batch) for b in range(batch)]
    steps = len(tokens)
    decode = (steps - 1) / (times[steps - 1] - times[0]) if steps > 1 and times[steps - 1] > times[0] else None
    notes = [f"decoded in a batch of {size} (each prompt leaves it when it ends)"]
    budgets = None
    full = full_layer_counts(lay, n + appended)
    ideal = cache.ideal_counts(lay, n + appended, appended + question, r, batch) if m.compresses else full
    if m.compresses:
        budgets = cache.kept_counts(lay, m.window, r, batch)
        if budget >= n:
            notes.append(f"budget {budget} >= prompt length {n}: every prompt token is kept")
    return RunResult(
        method=method if isinstance(method, str) else m.name,
        text=lm.tokenizer.decode(tokens, skip_special_tokens=True).strip(), tokens=list(tokens), prompt_tokens=n,
        prefill_s=prefill_s, decode_tokens_per_s=decode, kv_entries=entries[r],
        kv_bytes=round(held_bytes(cache) * entries[r] / max(sum(entries), 1)),
        kv_entries_full=sum(full), kv_entries_ideal=sum(ideal),
        kv_bytes_full=counts_bytes(lay, full, elem) + state_bytes(cache) // batch,
        kv_bytes_ideal=counts_bytes(lay, ideal, elem) + state_bytes(cache) // batch,
        bytes_per_entry=entry_bytes(lay, elem), budgets=budgets, notes=notes)


@torch.no_grad()
def generate_cells(lm: LoadedModel, shared: Prefill, cells: list[tuple[methods.Method, int]],
                   max_new_tokens: int = 64, compress_sliding: bool = True,
                   question: list[int] | None = None) -> list[RunResult]:
    """Every compressing (method, budget) cell of one shared prefill decoded as one batch: a row per cell, each
    compressed by its own plan from the prefill's rows, in one cache (a segment per cell and KV head), one
    forward pass per step for all cells; a cell that ends leaves the batch. Each cell gets the tokens
    `generate(..., shared=shared)` gives it. MLA latents are one selection per layer: their cells run one by
    one. `question`: kvpress's protocol (`generate`'s `question_start`): `shared` is the context's prefill, and
    every cell reads these tokens through its compressed cache before it answers."""
    lay = lm.info.layout
    _own_prefill(lm.info.layout)
    n = len(shared.prompt_ids)
    question = list(question or [])
    alone = [c for c, (m, _) in enumerate(cells) if lay.latent or m.cache_kind != "heads" or len(cells) == 1]
    if alone:  # one selection per layer (MLA) or per prompt (a split): such cells decode one by one
        runs = dict(zip(alone, [generate(lm, shared.prompt_ids + question, m, b, max_new_tokens,
                                         compress_sliding=compress_sliding, shared=shared,
                                         question_start=n if question else None)
                                for m, b in (cells[c] for c in alone)], strict=True))
        rest = [c for c in range(len(cells)) if c not in runs]
        if rest:
            runs.update(zip(rest, generate_cells(lm, shared, [cells[c] for c in rest], max_new_tokens,
                                                 compress_sliding, question), strict=True))
        return [runs[c] for c in range(len(cells))]
    for m, _ in cells:
        if not m.compresses or shared.window < m.window:
            raise ValueError("cells must compress, from a prefill with rows for their window")
    plans = [make_plan(m, lay, n, b, compress_sliding) for m, b in cells]
    rows = len(cells)
    cache = cache_for(lay, cells[0][0], compress_sliding, lm.model.config)
    start = time.perf_counter()
    for i, own in enumerate(shared.layers):
        layer = cache.layers[i]
        if native.has_state(own):  # each cell its own copy of the prefill's state, one row each
            native.copy_state(own, layer)
            native.select_rows_of_state(layer, torch.zeros(rows, dtype=torch.long, device=lm.model.device))
        keys = getattr(own, "keys", None)
        if keys is None or (isinstance(keys, torch.Tensor) and keys.numel() == 0):
            continue
        if cache.kinds[i].compressible:
            cache.update(keys, own.values, i)  # one copy of the prompt's keys; each cell selects its own
            cache.compress(i, [k for plan in plans for k in plan.select(i, shared.rows[i][:, :, -plan.window:])])
        else:
            cache.update(keys.expand(rows, -1, -1, -1), own.values.expand(rows, -1, -1, -1), i)
    ends, elem = end_tokens(lm), torch.finfo(lm.model.dtype).bits // 8
    runs: list[RunResult | None] = [None] * rows
    active = list(range(rows))
    kwargs = {**with_cache(lm.model, cache), **last_logits_only(lm.model), "use_cache": True}
    prompt = shared.prompt_ids + question
    with capture.compressed(cache):
        if question:  # every cell reads the question through its own compressed cache, then answers
            asked = torch.tensor([question], device=lm.model.device).expand(rows, -1)
            pos = torch.arange(n, len(prompt), device=lm.model.device)[None].expand(rows, -1)
            token = lm.model(asked, position_ids=pos, **kwargs).logits[:, -1].argmax(-1)
        else:
            token = torch.full((rows,), shared.first, dtype=torch.long, device=lm.model.device)
        tokens: list[list[int]] = [[t] for t in token.tolist()]
        times = [time.perf_counter()]
        for _ in range(max_new_tokens):
            done = [r for r, c in enumerate(active) if tokens[c][-1] in ends or len(tokens[c]) >= max_new_tokens]
            for r in done:
                c = active[r]
                m, budget = cells[c]
                runs[c] = _batch_run(lm, lay, m, m, budget, rows, cache, r, len(active), prompt,
                                     tokens[c], times[0] - start + shared.seconds, times, elem, len(question))
            if done:
                active, index = leave(cache, active, done, lm.model.device)
                if index is None:
                    break
                token = token[index]
            logits = lm.model(token[:, None], **kwargs).logits[:, -1]
            token = logits.argmax(-1)
            for c, t in zip(active, token.tolist(), strict=True):
                tokens[c].append(t)
            times.append(time.perf_counter())
    for run in runs:
        run.notes[0] = f"decoded with {rows - 1} other cells of this prompt's prefill in one batch"
    return runs  # type: ignore[return-value]
