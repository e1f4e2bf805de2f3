import numpy as np
import pytest
import torch
from fakes import loaded
from tiny import ARCHS
from transformers import DynamicCache

from headprof import methods
from headprof.capture import AttentionCapture, implementation
from headprof.compressing import compress, generation
from headprof.methods.streaming import streaming_positions
from headprof.models import with_cache


def _ids(n=40, seed=0):
    return torch.randint(0, 96, (1, n), generator=torch.Generator().manual_seed(seed))


def _compressed_vs_full(lm, method, budget, steps=10, kv_scores=None):
    lay = lm.info.layout
    ids = _ids()
    n = ids.shape[1]
    with torch.no_grad():
        ref_cache = DynamicCache(config=lm.model.config)
        ref = [lm.model(ids, **with_cache(lm.model, ref_cache)).logits[:, -1]]
        plan = compress.make_plan(methods.resolve(method, kv_scores, window=8, kernel=7), lay, n, budget)
        cache = generation.cache_for(lay, plan.method, plan.compress_sliding)
        with generation.compressing(cache, 8, lambda _: plan):
            ours = [lm.model(ids, **with_cache(lm.model, cache)).logits[:, -1]]
            tok = ref[0].argmax(-1, keepdim=True)
            for _ in range(steps):  # more steps than the first tail room: the tail must grow
                ref.append(lm.model(tok, **with_cache(lm.model, ref_cache)).logits[:, -1])
                ours.append(lm.model(tok, **with_cache(lm.model, cache)).logits[:, -1])
                tok = ref[-1].argmax(-1, keepdim=True)
    return torch.stack(ref), torch.stack(ours), cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["snapkv", "headkv", "adakv", "pyramidkv", "streaming"])
def test_budget_above_prompt_reproduces_full_cache_logits(arch, method):
    lm = loaded(arch)
    scores = np.random.default_rng(0).random((3, lm.info.layout.num_kv_heads))
    ref, ours, _ = _compressed_vs_full(lm, method, budget=200, kv_scores=scores)
    assert torch.allclose(ref, ours, atol=1e-5)


def test_small_budget_changes_logits_and_holds_fewer_entries():
    lm = loaded("llama")
    ref, ours, cache = _compressed_vs_full(lm, "snapkv", budget=12)
    assert not torch.allclose(ref, ours, atol=1e-3)
    # 3 layers x 2 KV heads x (4 kept + 8 window + 10 appended)
    assert cache.entries() == 3 * 2 * (4 + 8 + 10)


def test_kept_positions_equal_naive_snapkv():
    lm = loaded("llama")
    ids = _ids(60, 3)
    with torch.no_grad(), implementation(lm.model, "eager"):
        att = lm.model(ids, output_attentions=True).attentions
    lay = lm.info.layout
    plan = compress.make_plan(methods.build("snapkv", window=8, kernel=5), lay, 60, 20)
    rows = {}
    with torch.no_grad(), AttentionCapture(lambda layer, p: rows.__setitem__(layer, p), last_n=8):
        lm.model(ids)
    for layer in range(lay.num_layers):
        kept = plan.select(layer, rows[layer])
        for kv in range(lay.num_kv_heads):
            # naive: loop over positions, mean over window and group, max over the kernel neighbourhood
            a = att[layer][0, 2 * kv:2 * kv + 2, -8:, :52].float().mean(dim=(0, 1))
            pooled = [max(a[max(0, i - 2):i + 3]).item() for i in range(52)]
            # max-pooling makes plateaus, so compare the kept scores with the 12 best (ties may pick either)
            chosen = kept[kv][:12].tolist()
            assert chosen == sorted(chosen) and len(set(chosen)) == 12
            np.testing.assert_allclose(sorted(pooled[i] for i in chosen), sorted(pooled)[-12:], rtol=1e-6)
            assert kept[kv][12:].tolist() == list(range(52, 60))


def test_streaming_keeps_sink_and_recent():
    assert streaming_positions(100, 10).tolist() == [0, 1, 2, 3, 94, 95, 96, 97, 98, 99]


def test_generate_measures_bytes_held_and_continues_positions():
    lm = loaded("llama")
    ids = _ids(50, 1)[0].tolist()
    full = generation.generate(lm, ids, "full", 0, max_new_tokens=6)
    same = generation.generate(lm, ids, "snapkv", 400, max_new_tokens=6)
    assert same.tokens == full.tokens  # positions continue correctly after compression (RoPE)
    assert same.notes and "every prompt token" in same.notes[0]
    small = generation.generate(lm, ids, methods.build("snapkv", window=8), 16, max_new_tokens=6)
    lay = lm.info.layout
    per_entry = 2 * lay.head_dim * 4
    # kept (8) + window (8) + 5 appended tokens per KV head (the 6th is produced, never fed back)
    assert small.kv_entries == small.kv_entries_ideal == lay.num_layers * lay.num_kv_heads * (8 + 8 + 5)
    assert small.kv_entries * per_entry <= small.kv_bytes <= 1.05 * small.kv_bytes_ideal
    assert full.kv_bytes == full.kv_entries * per_entry == full.kv_bytes_full
    for r in (full, small):  # 5 decode steps: the first one timed on its own, the other 4 make the steady rate
        assert r.first_step_s > 0 and r.steady_tokens_per_s > 0
        total = 5 / r.decode_tokens_per_s
        assert abs(4 / r.steady_tokens_per_s + r.first_step_s - total) < 1e-6 * total
