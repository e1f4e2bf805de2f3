"""`kept_positions` says what the compressed cache holds: the keys a HeadKVLayer keeps are the full prefill's keys
at exactly those positions, per layer and KV head (GQA, sliding-window and soft-capped models)."""

import numpy as np
import pytest
import torch
from fakes import loaded

from headprof import HeadprofError, methods
from headprof.compressing import compress, generation
from headprof.compressing.selection import kept_positions
from headprof.kv.decode_cache import alone
from headprof.kv.heads import HeadKVLayer
from headprof.models import with_cache


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gemma2"])
@pytest.mark.parametrize("method", ["snapkv", "headkv", "adakv"])
def test_kept_positions_are_the_keys_the_cache_holds(arch, method):
    lm = loaded(arch)
    lay = lm.info.layout
    scores = np.random.default_rng(1).random((lay.num_layers, lay.num_kv_heads))
    m = methods.resolve(method, scores, window=8, kernel=5)
    ids = torch.randint(0, 96, (1, 50), generator=torch.Generator().manual_seed(2))
    kept = kept_positions(lm, ids[0].tolist(), m, 16)
    plan = compress.make_plan(m, lay, 50, 16, True)
    cache = generation.cache_for(lay, m, True)
    full = alone(lm.model.config)  # every layer keeps every prompt token
    with torch.no_grad():
        lm.model(ids, **with_cache(lm.model, full))
        with generation.compressing(cache, 8, lambda _: plan):
            lm.model(ids, **with_cache(lm.model, cache))
    checked = 0
    for i, layer in enumerate(cache.layers):
        if not (isinstance(layer, HeadKVLayer) and layer.compressed):
            assert kept.positions[i] is None
            continue
        for h in range(lay.kv_heads(i)):
            keys, _, _ = layer.head_kv(h)
            pos = kept.positions[i][h]
            assert len(pos) == layer.lens[h] == kept.budgets[i, h] + 8
            assert torch.equal(keys, full.layers[i].keys[0, h, torch.as_tensor(pos)])
            checked += 1
    assert checked >= lay.num_kv_heads  # at least one layer was compressed and read back
    cov = kept.coverage(kept.positions[-1][0][:3])
    assert cov[-1, 0] == 1.0 and np.all((cov[~np.isnan(cov)] >= 0) & (cov[~np.isnan(cov)] <= 1))


def test_kept_positions_refuses_what_it_cannot_say():
    lm = loaded("llama")
    with pytest.raises(HeadprofError, match="keeps every token"):
        kept_positions(lm, list(range(40)), "full", 16)
    with pytest.raises(HeadprofError, match="observation window"):
        kept_positions(lm, list(range(10)), methods.resolve("snapkv", window=16), 20)


def test_a_span_is_found_by_its_characters():
    from tiny import char_tokenizer

    from headprof.compressing.selection import span_positions

    tok = char_tokenizer()
    ids = tok("the cat sat by the cat door")["input_ids"]
    assert span_positions(tok, ids, "cat") == [19, 20, 21]  # the last occurrence
    assert span_positions(tok, ids, "cat sat") == [4, 5, 6, 7, 8, 9, 10]  # the space between is a token too
    with pytest.raises(HeadprofError, match="does not occur"):
        span_positions(tok, ids, "dog")
