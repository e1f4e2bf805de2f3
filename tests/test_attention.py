"""Batched attention over a compressed cache equals the per-head computation; bytes held are real."""

import numpy as np
import pytest
import torch
from fakes import loaded

from headprof import methods
from headprof.compressing import compress, generation
from headprof.errors import HeadprofError
from headprof.kv import readers as attention
from headprof.kv.cache import HeadKVCache
from headprof.kv.heads import HeadKVLayer
from headprof.kv.segments import MAX_BUCKETS, buckets_of, windows
from headprof.models import with_cache
from headprof.probing import reference

CASES = [("llama", False), ("llama-mha", False), ("qwen2", False), ("mistral", False),
         ("gemma3", True), ("gemma2", True), ("gemma3", False), ("gpt_oss", True)]


def _decode_compared(lm, method, budget, compress_sliding, steps=(1, 1, 3, 1, 2, 1, 1, 1, 4, 1), n=60):
    """Prefill with compression, decode `steps` tokens at a time; compare every compressed layer's
    batched attention with the per-head reference. Returns the largest difference and the cache."""
    lay = lm.info.layout
    ids = torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(5))
    scores = np.random.default_rng(1).random((lay.num_layers, lay.num_kv_heads)) ** 4  # skewed budgets
    plan = compress.make_plan(methods.resolve(method, scores, window=8, kernel=7, beta=1.05), lay, n, budget,
                              compress_sliding)
    cache = generation.cache_for(lay, plan.method, plan.compress_sliding)
    worst = []
    batched = attention.attend

    def both(layer, query, scaling, softcap, backend=None, sinks=None):
        out = batched(layer, query, scaling, softcap, backend, sinks)
        ref = reference.per_head_attention(layer, query, scaling, softcap, sinks)
        worst.append(float((out - ref).abs().max()))
        return out

    attention.attend = both
    try:
        with torch.no_grad(), generation.compressing(cache, 8, lambda _: plan):
            lm.model(ids, **with_cache(lm.model, cache))
            for q in steps:
                tok = torch.randint(0, 96, (1, q), generator=torch.Generator().manual_seed(q))
                lm.model(tok, **with_cache(lm.model, cache))
    finally:
        attention.attend = batched
    return worst, cache, plan


@pytest.fixture(params=["one view", "buckets"])
def split(request, monkeypatch):
    """Layers read through one strided view, or split into buckets wherever heads differ (a split costing one
    column: as many buckets as pay)."""
    from headprof.kv import segments

    monkeypatch.setattr(segments, "SPLIT_SCALARS", {} if request.param == "one view" else {"cpu": 1, "cuda": 1})
    return request.param


@pytest.mark.parametrize("arch,compress_sliding", CASES)
@pytest.mark.parametrize("method", ["headkv", "snapkv"])
def test_batched_attention_equals_per_head_reference(arch, compress_sliding, method, split):
    lm = loaded(arch)
    worst, cache, plan = _decode_compared(lm, method, 24, compress_sliding)
    if split == "buckets" and method == "headkv" and lm.info.layout.num_kv_heads > 1:
        assert any(len(layer.buckets) > 1 for layer in cache.layers if isinstance(layer, HeadKVLayer))
    compressed_layers = sum(isinstance(layer, HeadKVLayer) for layer in cache.layers)
    assert compressed_layers == int(plan.compressible.any(axis=1).sum()) > 0
    assert len(worst) == 10 * compressed_layers  # every decode step of every compressed layer was compared
    assert max(worst) < 1e-5
    if method == "headkv" and lm.info.layout.num_kv_heads > 1 and split == "one view":  # skewed budgets: reordered
        assert any(not layer.uniform and not layer.in_order for layer in cache.layers if isinstance(layer, HeadKVLayer))


def test_sliding_layers_compressed_inside_their_window_forget_old_keys(split):
    lm = loaded("gemma3", sliding_window=20)  # layers 0 and 2 slide
    steps = (1,) * 30
    worst, cache, plan = _decode_compared(lm, "snapkv", 12, True, steps=steps)
    assert len(worst) == 3 * 30 and max(worst) < 1e-5
    for layer in (0, 2):
        assert plan.first_candidate(layer) == 60 - 20 + 1
        lay = cache.layers[layer]
        kept = torch.cat([lay.head_kv(h)[2][:n] for h, n in enumerate(lay.lens)])
        assert int(kept.min()) >= 60 - 20 + 1 and kept.numel() == 12  # chosen inside the window only
    # 30 tokens decoded with a window of 20: the tail dropped entries the window has passed
    assert cache.layers[0].dropped > 0 and cache.layers[0].generated < 30


@pytest.mark.parametrize("arch,method", [("llama", "headkv"), ("gemma3", "headkv"), ("llama-mha", "snapkv")])
def test_layers_grow_together_and_hold_at_most_the_slack_over_their_tokens_after_every_token(arch, method, split):
    """Every compressed layer grows at the same token (one burst), and right after any token, what they hold
    beyond their tokens' bytes (free room, masks, positions) stays within SLACK of those bytes."""
    from headprof.kv.heads import SLACK

    lm = loaded(arch, sliding_window=20) if arch == "gemma3" else loaded(arch)
    lay = lm.info.layout
    ids = torch.randint(0, 96, (1, 200), generator=torch.Generator().manual_seed(5))
    scores = np.random.default_rng(1).random((lay.num_layers, lay.num_kv_heads)) ** 4
    m = methods.resolve(method, scores, window=8, kernel=7, beta=1.05)
    plan = compress.make_plan(m, lay, 200, 64, True)  # (a head of ~20 tokens: one slot is 5%)
    cache = generation.cache_for(lay, plan.method, plan.compress_sliding)
    layers = [layer for layer in cache.layers if isinstance(layer, HeadKVLayer)]
    bursts = 0
    with torch.no_grad(), generation.compressing(cache, 8, lambda _: plan):
        lm.model(ids, **with_cache(lm.model, cache))
        for step in range(40):
            before = [layer.kv for layer in layers]
            lm.model(torch.tensor([[step % 96]]), **with_cache(lm.model, cache))
            grown = [layer.kv is not b for layer, b in zip(layers, before, strict=True)]
            assert not any(grown) or all(grown)
            bursts += all(grown)
            assert len({layer.room - layer.generated for layer in layers}) == 1
            token_bytes = sum(layer.entries() * layer.kv.shape[-1] * layer.kv.element_size() for layer in layers)
            assert sum(layer.nbytes() for layer in layers) <= (1 + SLACK) * token_bytes
    assert 3 <= bursts < 40  # the room grew in steps, several tokens apart
    if arch == "gemma3":  # 40 tokens past a window of 20: sliding layers dropped what it passed, at the bursts
        assert all(layer.generated < 40 for layer in layers if layer.sliding_window)


SIZES = [[40] * 8, [415, 36, 66, 166, 96, 116, 73, 56], [5, 900, 17, 64, 300, 8, 1200, 40], [1], [3, 3, 4],
         list(range(1, 65)), [35] * 128 + [42] * 32 + [87] * 32 + [291] * 32 + [358] * 32]


@pytest.mark.parametrize("split", [None, 64, 2048])
@pytest.mark.parametrize("sizes", SIZES)
def test_every_segment_lies_in_its_own_window_and_no_padding_is_stored(sizes, split):
    w = windows(sizes, split)
    _check(w, sizes)
    assert 1 <= len(w.buckets) <= MAX_BUCKETS
    if len(set(sizes)) == 1:
        assert len(w.buckets) == 1 and w.buckets[0].stride == w.buckets[0].width == sizes[0]  # a plain dense view
        assert w.order == list(range(len(sizes)))
    if split is None:
        assert len(w.buckets) == 1
    for by in (1, 7, -min(sizes) + 1):  # the room grows (or a sliding layer shrinks it): windows only shift
        _check(w.grown(by), [n + by for n in sizes])


def _check(w, sizes):
    assert sorted(w.order) == list(range(len(sizes)))
    assert w.buckets[0].lo == 0 and w.buckets[-1].hi == len(sizes)
    end = 0
    for b, after in zip(w.buckets, w.buckets[1:] + (None,), strict=True):
        assert after is None or after.lo == b.hi  # buckets cover the windows in order
        assert b.base == end  # each bucket's view starts where its first segment does
        for i in range(b.lo, b.hi):
            h = w.order[i]
            assert w.start[i] == end  # segments back to back: the buffer holds nothing else
            left = b.base + (i - b.lo) * b.stride
            assert left <= w.start[i] and w.start[i] + sizes[h] <= left + b.width
            end += sizes[h]
        assert b.base + (b.hi - b.lo - 1) * b.stride + b.width == end  # the bucket's last window ends with it
    assert end == sum(sizes)


def test_unequal_windows_are_far_narrower_than_the_whole_layer():
    sizes = [415, 36, 66, 166, 96, 116, 73, 56]  # a skewed HeadKV layer
    assert windows(sizes).buckets[0].width <= 1.05 * max(sizes) < 0.45 * sum(sizes)


def _columns(w, sizes):
    return sum((b.hi - b.lo) * b.width for b in w.buckets)


def test_buckets_read_fewer_columns_where_heads_differ_widely_and_split_only_where_it_pays():
    """A batch of skewed layers (the bench's HeadKV at budget 128, 32 sequences): one view reads 4.4x its entries;
    buckets of similar sizes read close to the entries themselves. A split costs a call, so it is made only where
    it saves more columns than `split`."""
    sizes = SIZES[-1]
    one, split = windows(sizes), windows(sizes, 2048)
    assert _columns(one, sizes) > 4 * sum(sizes)
    assert 1 < len(split.buckets) and _columns(split, sizes) < 1.2 * sum(sizes)
    assert len(windows(sizes, 10 ** 9).buckets) == 1  # a call dearer than any saving: one view
    few = [35, 42, 87, 291, 358, 35, 35, 35]  # one sequence's layer: saving 1,700 columns is not worth 2048
    assert len(windows(few, 2048).buckets) == 1 and len(windows(few, 64).buckets) > 1
    assert all(sizes[g[0]] <= sizes[g[-1]] for groups in buckets_of(sizes, 2048) for g in groups)


def test_keys_and_values_of_different_widths_share_the_buffer():
    """Some attention variants give values another width than keys (DeepSeek-V2/V3 MLA: 192 vs 128)."""
    g = torch.Generator().manual_seed(4)
    layer = HeadKVLayer()
    layer.keys, layer.values = torch.randn(1, 4, 80, 16, generator=g), torch.randn(1, 4, 80, 8, generator=g)
    layer.seen = 80
    layer.compress([torch.randperm(80, generator=g)[:n].sort().values for n in (50, 6, 21, 9)])
    assert not layer.uniform and layer.kv.shape[-1] == 24
    for q in (1, 1, 3, 1, 1, 1, 1, 1, 2, 1):  # enough tokens to grow the room several times
        layer.update(torch.randn(1, 4, q, 16, generator=g), torch.randn(1, 4, q, 8, generator=g))
        query = torch.randn(1, 8, q, 16, generator=g)
        out = attention.attend(layer, query, 0.25, None)
        assert out.shape == (1, q, 8, 8)
        assert (out - reference.per_head_attention(layer, query, 0.25, None)).abs().max() < 1e-5


def _ops_per_step(heads: int) -> tuple[int, int]:
    """Tensor operations one decode step of one compressed layer runs (write + attention), with skewed
    per-head counts; a step that does not grow the room. And the layer's buckets."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(heads)
    layer = HeadKVLayer()
    layer.keys, layer.values = torch.randn(1, heads, 400, 16, generator=g), torch.randn(1, heads, 400, 16, generator=g)
    layer.seen = 400
    layer.compress([torch.randperm(400, generator=g)[:n].sort().values for n in (5 + (np.arange(heads) * 7) % 390)])
    new, query = torch.randn(1, heads, 1, 16, generator=g), torch.randn(1, 2 * heads, 1, 16, generator=g)
    while layer.generated + 1 > layer.room - 1:  # leave the step that grows behind
        layer.update(new, new)
    with Count():
        layer.update(new, new)
        attention.attend(layer, query, 0.25, None)
    return Count.n, len(layer.buckets)


def test_a_decode_step_costs_the_same_operations_for_any_number_of_heads(monkeypatch):
    """No loop over heads per decoded token: 4 or 32 KV heads, one write and one attention call per layer; split
    into buckets (256 heads), a few operations more per bucket, and never more than MAX_BUCKETS buckets."""
    from headprof.kv import segments

    monkeypatch.setattr(segments, "SPLIT_SCALARS", {})  # one view per layer
    one = _ops_per_step(4)
    assert one == _ops_per_step(32) == _ops_per_step(256) and one[0] <= 10 and one[1] == 1
    monkeypatch.setattr(segments, "SPLIT_SCALARS", {"cpu": 1 << 12})
    ops, buckets = _ops_per_step(256)
    assert 1 < buckets <= MAX_BUCKETS and ops <= one[0] + 5 * buckets  # per bucket: rows, mask, sdpa; a cat


def _storage_bytes(cache) -> int:
    """Bytes of every distinct storage the cache's tensors live in, measured independently of nbytes()."""
    seen = {}
    for layer in cache.layers:
        packed = isinstance(layer, HeadKVLayer) and layer.compressed
        names = ("k", "v", "positions", "_open") if packed else ("keys", "values")
        for name in names:
            t = getattr(layer, name, None)
            if t is not None:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("budget,new", [(64, 3), (64, 24), (128, 24), (32, 60)])
def test_bytes_held_are_the_tensors_and_within_5_percent_of_ideal_on_any_stop(budget, new):
    lm = loaded("llama")
    ids = torch.randint(0, 96, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    captured = {}
    original = HeadKVCache.__init__

    def keep(self, *a, **kw):
        original(self, *a, **kw)
        captured["cache"] = self

    HeadKVCache.__init__ = keep
    try:
        r = generation.generate(lm, ids, methods.resolve("headkv", np.random.default_rng(0).random((3, 2))),
                                budget, max_new_tokens=new)
    finally:
        HeadKVCache.__init__ = original
    assert r.kv_bytes == _storage_bytes(captured["cache"])
    assert r.kv_entries == r.kv_entries_ideal
    assert r.kv_bytes <= 1.05 * r.kv_bytes_ideal


@pytest.mark.parametrize("arch,softcap", [("llama", None), ("llama-mha", None), ("llama", 30.0)])
def test_flash_route_passes_each_window_bounds_and_layout_as_documented(monkeypatch, arch, softcap, split):
    """The CUDA kernel cannot run here; a stand-in with flash-attn's documented semantics checks what
    headprof hands it (window order, cache_leftpad / cache_seqlens, GQA layout, causal q > 1)."""
    import types

    import fakes

    monkeypatch.setitem(__import__("sys").modules, "flash_attn",
                        types.SimpleNamespace(flash_attn_with_kvcache=fakes.flash_attn_with_kvcache))
    lm = loaded(arch)
    lay = lm.info.layout
    worst, cache, _ = _decode_compared(lm, "headkv", 24, False)  # leaves a compressed cache behind
    layer = next(x for x in cache.layers if isinstance(x, HeadKVLayer) and not x.uniform
                 and (not x.in_order if split == "one view" else len(x.buckets) > 1))
    g = torch.Generator().manual_seed(3)
    for q in (1, 3):
        new = torch.randn(1, lay.num_kv_heads, q, lay.head_dim, generator=g)
        layer.update(new, torch.randn(new.shape, generator=g))
        query = torch.randn(1, lay.num_query_heads, q, lay.head_dim, generator=g)
        flash = attention.attend(layer, query, lay.head_dim ** -0.5, softcap, "flash")
        ref = reference.per_head_attention(layer, query, lay.head_dim ** -0.5, softcap)
        assert (flash - ref).abs().max() < 1e-5


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("backend", ["flash", "torch"])
def test_cuda_backends_equal_the_per_head_reference_in_bf16(backend, split):
    if backend not in attention.available("cuda", torch.bfloat16):
        pytest.skip(f"{backend} is not available here")
    torch.manual_seed(0)
    layer = HeadKVLayer()
    heads, group, d = 8, 4, 128
    lens = [5, 900, 17, 64, 300, 8, 1200, 40]
    keys = torch.randn(1, heads, 1500, d, device="cuda", dtype=torch.bfloat16)
    layer.keys, layer.values = keys, torch.randn_like(keys)
    layer.seen = 1500
    layer.compress([torch.randperm(1500, device="cuda")[:n].sort().values for n in lens])
    assert (len(layer.buckets) > 1) == (split == "buckets")
    for q in (1, 3):
        new = torch.randn(1, heads, q, d, device="cuda", dtype=torch.bfloat16)
        layer.update(new, torch.randn_like(new))
        query = torch.randn(1, heads * group, q, d, device="cuda", dtype=torch.bfloat16)
        fast = attention.attend(layer, query, d ** -0.5, None, backend)
        slow = attention.attend(layer, query, d ** -0.5, None, "torch")
        ref = reference.per_head_attention(layer, query.float(), d ** -0.5, None)
        assert (fast.float() - ref).abs().max() < 2e-2
        assert (fast.float() - slow.float()).abs().max() < 2e-2


def test_a_forced_backend_that_can_run_on_no_layer_is_refused_in_one_line(monkeypatch):
    """HEADPROF_ATTENTION=flash where flash-attn cannot run must not quietly measure `torch` under flash's name."""
    import importlib.util

    attention._pick.cache_clear()
    monkeypatch.setenv("HEADPROF_ATTENTION", "flash")
    with pytest.raises(HeadprofError, match=r"^HEADPROF_ATTENTION=flash: flash-attn runs on CUDA only, not cpu; unset"):
        attention.pick("cpu", torch.float32)
    assert "float16 or bfloat16, not float32" in attention.unavailable("flash", "cuda", torch.float32)
    with monkeypatch.context() as m:  # flash-attn absent, then present (transformers' own imports need the real one)
        m.setattr(importlib.util, "find_spec", lambda name: None)
        assert "not installed" in attention.unavailable("flash", "cuda", torch.bfloat16)
        m.setattr(importlib.util, "find_spec", lambda name: object())
        assert attention.unavailable("flash", "cuda", torch.bfloat16) is None
        kernel = ["triton"] if torch.cuda.is_available() else []  # the default on CUDA where Triton runs
        assert attention.available("cuda", torch.bfloat16) == kernel + ["torch", "flash"]
        assert attention.available("cuda", torch.bfloat16, sliding=True) == kernel + ["torch"]  # per layer: torch
    monkeypatch.setenv("HEADPROF_ATTENTION", "magic")
    with pytest.raises(HeadprofError, match="use one of flash, torch"):
        attention.pick("cpu", torch.float32)
    monkeypatch.setenv("HEADPROF_ATTENTION", "torch")
    assert attention.pick("cpu", torch.float32) == "torch"
    # and through a whole compressed generation: the refusal reaches the caller as headprof's own error
    monkeypatch.setenv("HEADPROF_ATTENTION", "flash")
    lm = loaded("llama")
    with pytest.raises(HeadprofError, match="CUDA only"):
        generation.generate(lm, list(range(5, 60)), methods.resolve("headkv", np.random.default_rng(0).random((3, 2))),
                            24, max_new_tokens=3)
    attention._pick.cache_clear()
