"""Compressed generation in batches: each prompt of a left-padded batch gets what it gets alone."""

import json
import re

import numpy as np
import pytest
import torch
from fakes import loaded
from tiny import save
from typer.testing import CliRunner

from headprof import api, methods
from headprof.cli import app
from headprof.compressing import generation
from headprof.errors import HeadprofError
from headprof.kv import heads, segments

LENGTHS = (70, 95, 83)  # different lengths: the batch is left-padded


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2"))


def _prompts(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (n,), generator=g).tolist() for n in LENGTHS]


def _method(lm, name):
    scores = np.random.default_rng(0).random((lm.info.layout.num_layers, lm.info.layout.num_kv_heads))
    return methods.resolve(name, scores, window=8, kernel=7)


def _decode(lm, m, ids, mask=None):
    with generation.compression(lm.model, m, budget=40) as c:
        out = lm.model.generate(ids, attention_mask=mask, cache=c, max_new_tokens=6, do_sample=False,
                                output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.scores, 1), c


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "mistral"])  # GQA, sliding-window layers
@pytest.mark.parametrize("name", ["snapkv", "headkv", "adakv", "pyramidkv", "streaming"])
def test_model_generate_in_a_batch_gives_each_prompt_its_own_logits(arch, name):
    _batch_equals_alone(arch, name)


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # GQA with 2 KV heads: heads that differ within a sequence
@pytest.mark.parametrize("name", ["headkv", "adakv"])
def test_a_batch_read_in_buckets_gives_each_prompt_its_own_logits(arch, name, monkeypatch):
    """Layers split into buckets of similar heads (a split costing one column: wherever heads differ)."""
    monkeypatch.setattr(segments, "SPLIT_SCALARS", {"cpu": 1})
    batch_cache = _batch_equals_alone(arch, name)
    assert any(len(layer.buckets) > 1 for layer in batch_cache.layers if isinstance(layer, heads.HeadKVLayer))


def _batch_equals_alone(arch, name):
    lm = loaded(arch)
    m = _method(lm, name)
    prompts = _prompts()
    width = max(LENGTHS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    tokens, logits, batch_cache = _decode(lm, m, ids, mask)
    alone_bytes = 0
    for b, p in enumerate(prompts):
        t, lg, c = _decode(lm, m, torch.tensor([p]))
        assert tokens[b].tolist() == t[0].tolist()
        torch.testing.assert_close(logits[b], lg[0], atol=1e-5, rtol=0)
        alone_bytes += sum(layer.nbytes() for layer in c.layers if isinstance(layer, heads.HeadKVLayer))
    held = sum(layer.nbytes() for layer in batch_cache.layers if isinstance(layer, heads.HeadKVLayer))
    # the same tokens held, one layout: within the cache's slack of what the prompts hold alone
    assert abs(held - alone_bytes) <= heads.SLACK * alone_bytes + 64 * len(prompts)
    return batch_cache


def test_padding_is_never_kept():
    lm = loaded("llama")
    prompts = _prompts()
    width = max(LENGTHS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    plan = generation.make_plan(_method(lm, "snapkv"), lm.info.layout, 70, 40)
    c = generation.cache_for(lm.info.layout, plan.method, True, lm.model.config)
    kept: list[list[torch.Tensor]] = []
    with generation.compressing(c, 8, lambda n: generation.make_plan(plan.method, lm.info.layout, n, 40)):
        original = c.compress
        c.compress = lambda layer, keep: (kept.append(keep), original(layer, keep))
        lm.model(ids, attention_mask=mask, cache=c)
    heads = lm.info.layout.num_kv_heads
    for keep in kept:
        for s, k in enumerate(keep):
            pad = width - LENGTHS[s // heads]
            assert int(k.min()) >= pad and int(k.max()) < width  # each sequence's own tokens only


def test_generate_many_equals_each_prompt_alone_and_reports_each():
    lm = loaded("gemma3")
    prompts = _prompts(2)
    m = _method(lm, "headkv")
    many = api.generate_many(lm, prompts, m, 40, batch_size=2, max_new_tokens=5)
    listed = api.generate(lm, prompts, m, 40, max_new_tokens=5)  # a list of prompts: a report each
    assert [r.runs[0].tokens for r in listed] == [r.runs[0].tokens for r in many]
    assert len(many) == 3 and "decoded in a batch of 2 (each prompt leaves it when it ends)" in many[0].runs[0].notes
    for p, report in zip(prompts, many, strict=True):
        alone = api.generate(lm, p, m, 40, max_new_tokens=5)
        assert [r.tokens for r in report.runs] == [r.tokens for r in alone.runs]
        assert report.prompt_tokens == len(p) and report.runs[0].kv_entries_ideal == alone.runs[0].kv_entries_ideal
        assert report.runs[0].budgets == alone.runs[0].budgets


def test_bad_batches_are_refused_before_any_work():
    lm = loaded("llama")
    with pytest.raises(HeadprofError, match="--batch-size must be at least 1"):
        api.generate_many(lm, _prompts(), "snapkv", 40, batch_size=0)
    with pytest.raises(HeadprofError, match=r"third: 600 tokens \+ 5 new tokens exceed the model's 512 positions"):
        api.generate_many(lm, [[5] * 60, [5] * 70, [5] * 600], "snapkv", 40, max_new_tokens=5,
                          names=["first", "second", "third"])


def test_run_takes_several_prompt_files_and_jsonl(tmp_path, tiny_dir):
    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text("The spare key is under the blue flowerpot by the door. " * 4 + "Where is the spare key?")
    b.write_text(json.dumps({"prompt": "Rain fell all day on the hills above the town. " * 4 + "What fell?"}) + "\n"
                 + json.dumps("The ferry left at noon and came back at six. " * 4 + "When did it leave?") + "\n")
    r = CliRunner().invoke(app, ["run", str(a), str(b), "--model", tiny_dir, "--method", "snapkv", "--budget", "40",
                                 "--max-new-tokens", "4", "--batch-size", "2", "--json"])
    assert r.exit_code == 0, r.output
    docs = json.loads(r.output)
    assert [d["prompt"] for d in docs] == [str(a), f"{b}:1", f"{b}:2"]
    assert all(len(d["runs"]) == 2 for d in docs)


@pytest.mark.parametrize("line,message", [
    ("{\"text\": 3}", r"b.jsonl:2: not a prompt"),
    ("not json", r"b.jsonl:2: not JSON"),
    ("\"  \"", r"b.jsonl:2: the prompt is empty"),
])
def test_run_names_the_bad_jsonl_line(tmp_path, tiny_dir, line, message):
    b = tmp_path / "b.jsonl"
    b.write_text(json.dumps("A prompt long enough to compress, " * 10) + "\n" + line + "\n")
    r = CliRunner().invoke(app, ["run", str(b), "--model", tiny_dir, "--batch-size", "2"])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1
    assert re.search(message, r.output), r.output


@pytest.mark.parametrize("split", [None, 1])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_a_sequence_that_ends_leaves_the_batch_and_the_others_go_on_as_alone(arch, split, monkeypatch):
    if split:  # layers in buckets (re-laid out when the sequence leaves)
        monkeypatch.setattr(segments, "SPLIT_SCALARS", {"cpu": split})
    lm = loaded(arch)
    m = _method(lm, "headkv")
    prompts = _prompts(3)
    width = max(LENGTHS)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    c = generation.cache_for(lm.info.layout, m, True, lm.model.config)
    seen = []
    with torch.no_grad(), generation.compressing(c, 8, lambda n: generation.make_plan(m, lm.info.layout, n, 40,
                                                                                       True)):
        logits = lm.model(ids, attention_mask=mask, position_ids=pos, cache=c).logits[:, -1]
        last = pos[:, -1]
        for step in range(8):
            token = logits.argmax(-1)
            seen.append(logits)
            if step == 3:  # the second prompt ends: its segments leave every layer
                before = c.nbytes()
                keep = torch.tensor([0, 2])
                c.batch_select_indices(keep)
                token, mask, last = token[keep], mask[keep], last[keep]
                assert c.nbytes() < before
            mask = torch.cat([mask, mask.new_ones(len(token), 1)], -1)
            last = last + 1
            logits = lm.model(token[:, None], attention_mask=mask, position_ids=last[:, None], cache=c).logits[:, -1]
    for row, b in ((0, 0), (1, 2)):
        _, alone, _ = _decode(lm, m, torch.tensor([prompts[b]]))
        got = torch.stack([s[b] if i <= 3 else s[row] for i, s in enumerate(seen[:6])])
        torch.testing.assert_close(got, alone[0], atol=1e-5, rtol=0)


def test_a_batch_left_with_equal_segments_drops_its_mask():
    layer = heads.HeadKVLayer()
    k = torch.randn(2, 2, 30, 8)
    layer.update(k, k.clone())
    keep = [torch.arange(5), torch.arange(9), torch.arange(6), torch.arange(6)]  # sequence 0 unequal, 1 equal
    layer.compress(keep)
    assert not layer.uniform and layer._open is not None
    layer.select_sequences([1])
    assert layer.uniform and layer._open is None and layer.batch == 1
    layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))  # one decode step: no stale mask to open
    assert layer.entries() == 6 + 6 + 2


def test_a_batch_out_of_memory_is_halved_and_keeps_the_prompts_that_finished(monkeypatch):
    lm = loaded("llama")
    prompts = _prompts(4) + _prompts(5)[:1]  # 4 prompts
    want = [api.generate(lm, p, "snapkv", 40, max_new_tokens=5, baseline=False).runs[0].tokens for p in prompts]
    lm.model.generation_config.eos_token_id = want[1][1]  # prompt 2 ends at its second token, the others run on
    want = [api.generate(lm, p, "snapkv", 40, max_new_tokens=5, baseline=False).runs[0].tokens for p in prompts]
    forward, calls = lm.model.forward, []

    def tight(*args, **kwargs):  # a device that holds 3 sequences for at most two decode steps
        ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(ids.shape)
        if ids.shape[0] >= 3 and ids.shape[1] == 1 and sum(c[0] >= 3 and c[1] == 1 for c in calls) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(lm.model, "forward", tight)
    notes: list[str] = []
    many = api.generate_many(lm, prompts, "snapkv", 40, batch_size=4, max_new_tokens=5, baseline=False,
                             notice=notes.append)
    assert [r.runs[0].tokens for r in many] == want
    assert notes and "(1 had finished and are kept)" in notes[0] and "batches of 2" in notes[0], notes
