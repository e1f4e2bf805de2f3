"""Layer kinds come from transformers' own table: a kind headprof cannot compress is refused, never taken for
full attention, and layers may differ in their heads."""

import dataclasses

import pytest
import torch
from fakes import loaded
from transformers import AutoModelForCausalLM, Gemma4TextConfig, Llama4TextConfig
from transformers.cache_utils import DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

from headprof import methods, models
from headprof.compressing import compress, generation
from headprof.errors import ModelError
from headprof.kv import cache, heads


def _llama4(**kw):  # chunked attention in three of four layers (Llama 4's local layers)
    return Llama4TextConfig(num_hidden_layers=4, attention_chunk_size=32, hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, intermediate_size=64, intermediate_size_mlp=64,
                            vocab_size=96, **kw)


def test_kinds_and_windows_come_from_transformers():
    lay = models.layout_of(_llama4())
    assert lay.attention_kinds == ("chunked_attention",) * 3 + ("full_attention",)
    assert lay.layer_windows == (32, 32, 32, None) and lay.sliding_window is None
    gemma = loaded("gemma3").info.layout
    assert gemma.attention_kinds == ("sliding_attention", "full_attention", "sliding_attention")
    assert gemma.sliding_window == 8 and gemma.layer_windows == (8, None, 8)
    assert models.unsupported_kinds(gemma) == {} and models.unsupported_kinds(lay) == {}
    odd = dataclasses.replace(lay, attention_kinds=("lightning_attention",) + lay.attention_kinds[1:])  # unknown
    assert models.unsupported_kinds(odd) == {"lightning_attention": [0]}
    with pytest.raises(ModelError, match=r"cannot compress .*lightning_attention in layers 0.*--method full"):
        compress.make_plan(methods.get("snapkv"), odd, 100, 40)


def test_chunked_attention_layers_are_kept_as_the_model_keeps_them_and_the_budget_goes_to_the_others():
    lay = models.layout_of(_llama4())
    assert compress.compressed_layers(lay, methods.get("snapkv"), True) == [False, False, False, True]
    assert compress.compressed_layers(lay, methods.get("full"), True) == [False] * 4
    plan = compress.make_plan(methods.get("snapkv"), lay, 100, 40)
    assert plan.budgets[:3].sum() == 0 and (plan.budgets[3] == 40 - plan.window).all()
    c = generation.cache_for(lay, methods.get("snapkv"))
    assert [type(layer) for layer in c.layers[:3]] == [DynamicSlidingWindowLayer] * 3
    torch.manual_seed(0)
    lm = loaded("llama")
    m = AutoModelForCausalLM.from_config(_llama4(), dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    from headprof.capture import attach

    info = models.ModelInfo("tiny-llama4", "tiny-llama4", None, None, type(m).__name__, m.config.model_type, lay,
                            512, False)
    l4 = models.LoadedModel(m, lm.tokenizer, info, "cpu", "float32", attach(m))
    ids = torch.randint(0, 96, (80,), generator=torch.Generator().manual_seed(0)).tolist()
    r = generation.generate(l4, ids, "full", 0, max_new_tokens=3)
    assert len(r.tokens) == 3 and r.kv_entries_full == 2 * (3 * 32 + 82)  # chunked layers hold their chunk
    above = generation.generate(l4, ids, "snapkv", 100, max_new_tokens=3)
    assert above.tokens == r.tokens and "chunks of 32 tokens" in " ".join(above.notes)
    small = generation.generate(l4, ids, "snapkv", 20, max_new_tokens=3)
    assert small.kv_bytes < r.kv_bytes and small.budgets[:3] == [[0, 0]] * 3


def test_layers_headprof_leaves_alone_get_transformers_own_cache_layer():
    c = cache.HeadKVCache(["full_attention", "sliding_attention", "dummy", "full_attention"],
                          [False, False, False, True], [None, 8, None, None])
    assert [type(layer) for layer in c.layers[:3]] == [DynamicLayer, DynamicSlidingWindowLayer, DummyLayer]
    assert isinstance(c.layers[3], heads.HeadKVLayer) and c.layers[1].sliding_window == 8
    assert cache.full_layer_entries("dummy", None, 100, 2) == 0  # KV shared with an earlier layer: nothing held


def test_layers_may_differ_in_head_size_kv_heads_and_query_heads():
    """Gemma 4's per-layer config: full-attention layers with larger heads and (K = V) fewer KV heads read per layer,
    and query heads that differ by layer (dots.3's sliding layers have half its others'): one grid as wide as the
    widest layer (a model with them is run in tests/test_model_kinds.py)."""
    config = Gemma4TextConfig(num_hidden_layers=4, sliding_window=64, num_attention_heads=4, num_key_value_heads=2,
                              hidden_size=64, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
                              attention_k_eq_v=True, intermediate_size=64, vocab_size=96,
                              layer_types=["sliding_attention", "full_attention"] * 2)
    lay = models.layout_of(config)
    assert [lay.head_size(i) for i in range(4)] == [16, 32, 16, 32] and lay.head_dim == 16
    assert [lay.kv_heads(i) for i in range(4)] == [2, 1, 2, 1] and lay.num_kv_heads == 2
    assert [lay.entry_size(i) for i in range(4)] == [32, 64, 32, 64]
    config = Gemma4TextConfig(num_hidden_layers=4, sliding_window=64, num_attention_heads=4, num_key_value_heads=2,
                              hidden_size=64, head_dim=16, intermediate_size=64, vocab_size=96,
                              layer_types=["sliding_attention", "full_attention"] * 2,
                              per_layer_config={1: {"head_dim": 32}, 3: {"head_dim": 32, "num_attention_heads": 2,
                                                                         "num_key_value_heads": 1}})
    lay = models.layout_of(config)
    assert lay.layer_query_heads == (4, 4, 4, 2) and [lay.group(i) for i in range(4)] == [2, 2, 2, 2]
