"""The full/streaming split (`methods/split.py` on the `kv/split.py` kind): full heads keep every token, streaming
heads a sink and a rolling window whose memory stays constant; attention over both pools equals the per-head
computation over exactly those tokens."""

import numpy as np
import pytest
import torch
from fakes import loaded
from typer.testing import CliRunner

from headprof import methods
from headprof.cli import app
from headprof.compressing import generation
from headprof.errors import HeadprofError, MethodError
from headprof.kv.split import SplitLayer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tiny import save

    return str(save("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2"))


def _reference(keys, values, held, query, scaling, softcap):
    """Per KV head, attention of its query heads over the positions `held[h]` of all tokens so far (b = 1, q = 1)."""
    heads, group = keys.shape[1], query.shape[1] // keys.shape[1]
    out = []
    for h in range(heads):
        k, v = keys[0, h, held[h]].float(), values[0, h, held[h]].float()
        logits = query[0, h * group:(h + 1) * group, 0].float() @ k.T * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        out.append(torch.softmax(logits, -1) @ v)
    return torch.stack(out).reshape(1, 1, heads * group, -1)


@pytest.mark.parametrize("softcap", [None, 20.0])
def test_attention_reads_the_whole_cache_of_full_heads_and_the_sink_and_window_of_the_others(softcap):
    g = torch.Generator().manual_seed(0)
    heads, group, dim, prompt, sink, recent = 4, 3, 16, 30, 2, 6
    keys = torch.randn(1, heads, prompt + 40, dim, generator=g)
    values = torch.randn(keys.shape, generator=g)
    layer = SplitLayer()
    layer.update(keys[:, :, :prompt], values[:, :, :prompt])
    ring = torch.cat([torch.arange(sink), torch.arange(prompt - recent, prompt)])
    full = {1, 3}
    layer.compress([torch.arange(prompt) if h in full else ring for h in range(heads)])
    assert layer.entries() == 2 * prompt + 2 * (sink + recent)
    for t in range(prompt, prompt + 40):  # 40 steps: the window rolls over several times
        layer.update(keys[:, :, t:t + 1], values[:, :, t:t + 1])
        query = torch.randn(1, heads * group, 1, dim, generator=g)
        out, _ = layer.attend(None, query, keys, values, None, dim ** -0.5, softcap)
        seen = torch.arange(t + 1)
        window = torch.cat([torch.arange(sink), seen[-recent:]])
        ref = _reference(keys, values, [seen if h in full else window for h in range(heads)], query, dim ** -0.5,
                         softcap)
        assert (out - ref).abs().max() < 1e-5, t
    assert layer.entries() == 2 * (prompt + 40) + 2 * (sink + recent)  # the streaming heads hold what they held


def test_streaming_heads_must_keep_the_same_positions():
    layer = SplitLayer()
    layer.update(torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8))
    with pytest.raises(HeadprofError, match="streaming heads must keep the same positions"):
        layer.compress([torch.arange(5), torch.arange(1, 6)])


def test_the_budget_buys_whole_heads_by_the_profile_and_the_rest_stream():
    scores = np.array([[0.1, 0.9], [0.5, 0.0], [0.8, 0.2]])
    every = np.ones((3, 2), dtype=bool)
    m = methods.build("split", profile=scores, window=8, sink=4, recent=24)
    budgets = m.allocate(200, np.full((3, 2), 992), every)  # prompt of 1000: streaming heads keep 4 + 24 - 8
    assert (budgets == 992).sum() == 1 and budgets[0, 1] == 992  # 6 x 192 pays for one whole head
    assert (budgets[budgets < 992] == 20).all() and budgets.sum() <= 192 * 6
    share = methods.build("split", profile=scores, full=0.5, recent=24, window=8).allocate(200, np.full((3, 2), 992),
                                                                                             every)
    assert sorted(zip(*np.nonzero(share == 992), strict=True)) == [(0, 1), (1, 0), (2, 0)]  # the top half by score


def test_a_long_generation_grows_only_the_full_heads():
    lm = loaded("llama")
    lay = lm.info.layout
    scores = np.random.default_rng(0).random((lay.num_layers, lay.num_kv_heads))
    prompt = torch.randint(0, 96, (120,), generator=torch.Generator().manual_seed(1)).tolist()
    split = methods.build("split", profile=scores, window=8, recent=24)
    short, long = (generation.generate(lm, prompt, split, 48, n, n) for n in (20, 220))
    whole = int((np.array(short.budgets) == 120 - 8).sum())
    assert 0 < whole < lay.num_layers * lay.num_kv_heads
    assert long.kv_entries - short.kv_entries == whole * 200  # streaming heads: constant
    assert long.kv_entries == long.kv_entries_ideal
    assert long.kv_bytes <= 1.05 * long.kv_bytes_ideal
    head = methods.build("headkv", profile=scores, window=8)
    h_short, h_long = (generation.generate(lm, prompt, head, 48, n, n) for n in (20, 220))
    assert h_long.kv_entries - h_short.kv_entries == lay.num_layers * lay.num_kv_heads * 200


def test_above_the_prompt_the_split_gives_the_full_caches_tokens():
    lm = loaded("gemma2")  # soft-capping and sliding layers (left as the model keeps them)
    scores = np.random.default_rng(2).random((lm.info.layout.num_layers, lm.info.layout.num_kv_heads))
    prompt = torch.randint(0, 96, (70,), generator=torch.Generator().manual_seed(3)).tolist()
    full = generation.generate(lm, prompt, "full", 0, max_new_tokens=12)
    split = generation.generate(lm, prompt, methods.build("split", profile=scores, window=8), 200, max_new_tokens=12)
    assert split.tokens == full.tokens


def test_eval_cells_of_a_split_decode_alone_and_match_their_own_run():
    lm = loaded("llama")
    scores = np.random.default_rng(4).random((lm.info.layout.num_layers, lm.info.layout.num_kv_heads))
    prompt = torch.randint(0, 96, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    shared = generation.prefill(lm, prompt, window=8)
    cells = [(methods.build("split", profile=scores, window=8, recent=16), 32),
             (methods.build("headkv", profile=scores, window=8), 32),
             (methods.build("snapkv", window=8), 32)]
    runs = generation.generate_cells(lm, shared, cells, max_new_tokens=10)
    for (m, b), run in zip(cells, runs, strict=True):
        alone = generation.generate(lm, prompt, m, b, max_new_tokens=10)
        assert run.tokens == alone.tokens and run.kv_entries == alone.kv_entries


@pytest.mark.parametrize("spec,message", [
    ("split:full=0", "full must be in \\(0, 1\\]"), ("split:full=1.5", "full must be in"),
    ("split:recent=-1", "sink and recent must be >= 0"), ("split:sink=-2", "sink and recent must be >= 0")])
def test_bad_split_options_are_refused_in_one_line(spec, message):
    with pytest.raises(MethodError, match=message):
        methods.parse_spec(spec).build()


def test_a_split_without_a_profile_is_refused_and_a_batch_of_prompts_too(tmp_path, tiny_dir):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The spare key is under the blue flowerpot by the door. " * 12 + "Where is the key?")
    r = CliRunner().invoke(app, ["run", "--model", str(tiny_dir), "--method", "split", "--budget", "40",
                                 "--max-new-tokens", "3", str(prompt)])
    assert r.exit_code == 2 and "split needs a profile" in r.output and "Traceback" not in r.output
    lm = loaded("llama")
    scores = np.ones((lm.info.layout.num_layers, lm.info.layout.num_kv_heads))
    with pytest.raises(HeadprofError, match="batched compression of full/streaming split layers is not supported"):
        generation.generate_batch(lm, [list(range(3, 60)), list(range(5, 50))],
                                  methods.build("split", profile=scores, window=8), 24, max_new_tokens=3)
