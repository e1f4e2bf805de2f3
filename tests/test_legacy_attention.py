"""Attention computed outside transformers' attention interface, in one call headprof takes over (`legacy.py`):
headprof's logits and answers equal the model's own code's, and what it cannot route is refused in one line."""

import pytest
import torch
from fakes import loaded
from transformers import AutoModelForCausalLM, FalconConfig, GPTNeoConfig

from headprof import capture, models
from headprof.capture import attach, implementation
from headprof.compressing import generation
from headprof.errors import ModelError


def test_gpt_neo_local_layers_attend_inside_their_window_over_a_cache_of_every_token():
    """GPT-Neo computes attention in a method of its own (`legacy.py` routes it) and its local layers' window is
    in their attention: headprof's logits and answers equal the model's own, and its full cache counts every token."""
    def neo(window):
        return GPTNeoConfig(num_layers=2, attention_types=[[["global", "local"], 1]], window_size=window,
                            hidden_size=64, num_heads=4, vocab_size=96, max_position_embeddings=256, bos_token_id=1,
                            eos_token_id=2, initializer_range=0.3)

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(neo(4), dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    ids = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        own_logits = m(torch.tensor([ids])).logits  # its own eager code
        wide = AutoModelForCausalLM.from_config(neo(256), dtype=torch.float32).eval()
        wide.load_state_dict(m.state_dict())
        assert not torch.allclose(wide(torch.tensor([ids])).logits, own_logits, atol=1e-3)  # the window matters
    own = m.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, 40:].tolist()
    lay = models.layout_of(m.config)
    assert lay.attention_kinds == ("full_attention", "local_attention") and lay.layer_windows == (None, 4)
    info = models.ModelInfo("tiny-neo", "tiny-neo", None, None, type(m).__name__, "gpt_neo", lay, 256, False)
    tiny = models.LoadedModel(m, loaded("llama").tokenizer, info, "cpu", "float32", attach(m))
    with torch.no_grad():
        assert torch.allclose(m(torch.tensor([ids])).logits, own_logits, atol=1e-4)
    full = generation.generate(tiny, ids, "full", 0, max_new_tokens=6)
    assert full.tokens == own and len(set(own)) > 1
    assert full.kv_entries_full == 2 * 4 * (40 + 5)  # the local layer's cache keeps every token, as GPT-Neo's does
    assert generation.generate(tiny, ids, "snapkv", 100, max_new_tokens=6).tokens == own
    small = generation.generate(tiny, ids, "snapkv", 24, max_new_tokens=6)
    assert small.kv_bytes < full.kv_bytes and small.budgets[1] == [0] * 4  # the local layer is kept as it is


def _tiny(m, model_type: str) -> models.LoadedModel:
    name = attach(m)
    info = models.ModelInfo("tiny", "tiny", None, None, type(m).__name__, model_type, capture.layout(m), 256, False)
    return models.LoadedModel(m, loaded("llama").tokenizer, info, "cpu", "float32", name)


@pytest.mark.parametrize("shape", [dict(multi_query=True), dict(new_decoder_architecture=True, num_kv_heads=2),
                                   dict(multi_query=False)])
def test_falcon_inline_sdpa_is_routed_and_equals_its_own_eager_and_sdpa_code(shape):
    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=96,
                          max_position_embeddings=256, bos_token_id=1, eos_token_id=2, initializer_range=0.3,
                          **shape)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    ids = torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        m.config._attn_implementation = "eager"
        own = m(ids[None]).logits
        m.config._attn_implementation = "sdpa"
        assert torch.allclose(m(ids[None]).logits, own, atol=1e-4)
    tokens = m.generate(ids[None], max_new_tokens=6, do_sample=False)[0, 40:].tolist()
    tiny = _tiny(m, "falcon")
    with torch.no_grad():
        assert torch.allclose(m(ids[None]).logits, own, atol=1e-4)
        with implementation(m, "eager"):  # the model's own code again, for checks
            assert torch.allclose(m(ids[None]).logits, own, atol=1e-4)
    full = generation.generate(tiny, ids.tolist(), "full", 0, max_new_tokens=6)
    assert full.tokens == tokens and len(set(tokens)) > 1
    assert generation.generate(tiny, ids.tolist(), "snapkv", 100, max_new_tokens=6).tokens == tokens
    small = generation.generate(tiny, ids.tolist(), "snapkv", 24, max_new_tokens=6)
    assert small.kv_bytes < full.kv_bytes


def test_falcon_with_alibi_is_refused_in_one_line():
    config = FalconConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=96, alibi=True)
    m = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with pytest.raises(ModelError, match="ALiBi") as e:
        attach(m)
    assert "\n" not in str(e.value)


def _as_inline(model) -> None:
    """Treat every layer of an attached model as attention written inline: its eager code runs and headprof reads
    and masks its softmax, as it does for Bloom (so the two ways of compressing one model can be compared)."""
    import dataclasses

    from headprof import legacy

    lay = capture.layout(model)
    every = tuple(range(lay.num_layers))
    capture._VERIFIED[model] = dataclasses.replace(lay, inline=every)
    capture.attach(model)
    legacy.read_inline(model, capture._inline_rows, lay.query_heads, frozenset(every),
                       lambda: capture._ACTIVE.get() is not None or capture._CACHE.get() is not None)


def _two_llamas():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    sdpa, inline = LlamaForCausalLM(cfg).eval(), LlamaForCausalLM(cfg).eval()
    inline.load_state_dict(sdpa.state_dict())
    attach(sdpa)
    _as_inline(inline)
    assert inline.config._attn_implementation == "eager"
    return sdpa, inline


@pytest.mark.parametrize("method", ["headkv", "adakv", "pyramidkv"])
def test_inline_attention_compressed_by_position_equals_headprofs_attention_function(method):
    """The inline kind (keys returned by position, the softmax masked to what each head holds) computes what
    headprof's own attention over the same per-head segments computes: same tokens, logits to float error, for
    heads of unequal budgets, one prompt and a left-padded batch; and it holds no more than the segments."""
    import numpy as np

    import headprof
    from headprof.kv.inline import InlineHeadKVLayer

    sdpa, inline = _two_llamas()
    scores = np.random.default_rng(1).random((3, 2))
    ids = torch.randint(5, 290, (2, 70), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    for batch in (ids[:1], ids):
        att = mask[:batch.shape[0]]
        runs = []
        for model in (sdpa, inline):
            with torch.no_grad(), headprof.compression(model, method, budget=28, profile=scores) as cache:
                out = model.generate(batch, attention_mask=att, cache=cache, max_new_tokens=12, do_sample=False,
                                     output_logits=True, return_dict_in_generate=True)
            runs.append((out.sequences, torch.stack(out.logits), cache))
        (seq_a, logits_a, cache_a), (seq_b, logits_b, cache_b) = runs
        assert isinstance(cache_b.layers[0], InlineHeadKVLayer) and len(set(cache_b.layers[0].lens)) > 1
        assert [layer.lens for layer in cache_a.layers] == [layer.lens for layer in cache_b.layers]
        assert torch.equal(seq_a, seq_b)
        torch.testing.assert_close(logits_a, logits_b, atol=2e-5, rtol=1e-4)
        assert cache_b.entries() == cache_a.entries() < 3 * 2 * batch.shape[0] * (70 + 11)
    with torch.no_grad():
        full = inline.generate(ids[:1], max_new_tokens=12, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    assert not torch.allclose(torch.stack(full.logits), logits_b[:, :1], atol=1e-3)  # the budget changed something


def test_inline_attention_that_escapes_headprof_is_an_error_not_a_full_cache(monkeypatch):
    """A compressed inline layer whose keys were read with no masked softmax would attend to zeros for every
    dropped key, and one whose prefill rows never came would keep its whole prompt: either run is refused in one
    line, never returned as compressed."""
    import contextvars

    import headprof
    from headprof import legacy

    _, inline = _two_llamas()
    ids = torch.randint(5, 290, (1, 60), generator=torch.Generator().manual_seed(3))

    def run():
        with torch.no_grad(), headprof.compression(inline, "snapkv", budget=28) as cache:
            inline.generate(ids, cache=cache, max_new_tokens=4, do_sample=False)

    run()
    with monkeypatch.context() as m:  # its softmax never sees the compressed layers' masks
        m.setattr(legacy, "PENDING_MASK", contextvars.ContextVar("elsewhere", default=None))
        with pytest.raises(ModelError, match="did not run the softmax headprof masks"):
            run()
    with monkeypatch.context() as m:  # no softmax is read at all
        m.setattr(legacy.InlineRows, "__torch_function__",
                  lambda self, func, types, args=(), kwargs=None: func(*args, **(kwargs or {})))
        with pytest.raises(ModelError, match="never saw their attention rows"):
            run()
