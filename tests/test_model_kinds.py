"""Any Hugging Face causal LM: one architecture per mechanism gets the status the support matrix
(benchmarks/model_matrix.py, docs/models.md) gives it, and what makes each status true is checked here."""

import contextlib
import dataclasses
import importlib.util as iu
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from headprof import api, layout, methods, models
from headprof.artefacts.profile import Profile
from headprof.cli import app
from headprof.compressing import compress
from headprof.errors import ProfileError
from headprof.kv import latent
from headprof.probing import families
from headprof.probing.decode import Decoder, ProbeJob, score_batch, score_probe
from headprof.probing.probes import RenderedProbe

_spec = iu.spec_from_file_location("model_matrix", Path(__file__).parents[1] / "benchmarks" / "model_matrix.py")
matrix = sys.modules.setdefault("model_matrix", iu.module_from_spec(_spec))
_spec.loader.exec_module(matrix)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Tiny random models of a few architectures, saved as local model folders."""
    root = tmp_path_factory.mktemp("archs")

    def make(model_type: str) -> Path:
        folder = root / model_type
        if not folder.exists():
            assert matrix.build(model_type, folder) is None
        return folder

    return make


@pytest.mark.slow
@pytest.mark.parametrize("model_type, status, mechanism", [
    ("llama", "works", "GQA"),
    ("gemma3_text", "works", "sliding"),
    ("qwen3_next", "works", "hybrid"),  # gated delta-net layers beside attention
    ("jamba", "works", "hybrid"),  # Mamba layers beside attention
    ("falcon_h1", "works", "hybrid"),  # Mamba and attention inside every layer
    ("zamba2", "works", "hybrid"),  # one attention block shared by several layers (layer_idx -1)
    ("gemma3n_text", "works", "KV-shared"),  # later layers attend over earlier layers' (compressed) KV
    ("deepseek_v3", "works", "MLA"),
    ("glm_moe_dsa", "works", "MLA"),  # sparse attention: an indexer's top-k over the latent it holds
    ("hy_v4", "scores only", "MLA"),  # sparse-attention layers reusing an earlier layer's top-k
    ("llama4_text", "works", "sliding"),  # chunked layers kept as the model keeps them
    ("minimax", "works", "hybrid"),  # takes only its own cache class
    ("mllama", "works", "GQA"),  # cross-attention layers, idle on text
    ("mamba", "refused", "attention-free"),
    ("bloom", "works", "legacy attention"),  # attention written inline: read from its softmax, masked there
    ("openai-gpt", "refused", "legacy attention"),  # inline attention with no cache: nothing marks its layers
    ("mimo_v2_flash", "works", "sliding"),  # its sliding layers cache twice the KV heads of its full layers
    ("gpt_oss", "works", "sliding"),  # a learned attention sink per head, which SDPA would drop
    ("bigbird_pegasus", "works", "dense"),  # a decoder whose attention modules say they are not causal
    ("gpt_neo", "works", "sliding"),  # attention in a method of its own (`legacy.py`), local layers' window in it
    ("falcon", "works", "GQA"),  # an inline scaled_dot_product_attention call, caught while the module runs
    ("diffllama", "scores only", "GQA"),  # one softmax run twice per layer over halves of its values
    ("kolibri1_1", "works", "hybrid"),  # its indexed layer attends over rounded keys: kept whole beside the others
    ("jetmoe", "refused", "?"),  # keys tiled per routed expert: which query head reads which key is unknown
    ("gemma4_text", "works", "sliding"),  # full-attention layers' heads twice the sliding layers' size
    ("deepseek_v4", "works", "compressed blocks"),  # its window compressed, its blocks as the model makes them
    ("inkling_text", "works", "hybrid"),  # its sliding layers cache KV heads of their own (swa_num_key_value_heads)
    ("dots3_note_text", "works", "MLA"),  # its sliding MLA layers (half the query heads) kept whole beside the others
])
def test_each_mechanism_gets_its_status(built, model_type, status, mechanism):
    folder = built(model_type)
    got, reason = matrix.classify(folder)
    assert (got, matrix.mechanism(folder)) == (status, mechanism), reason
    assert "\n" not in reason
    if model_type == "dots3_note_text":  # the tensors' query heads differ by layer; latents in a window stay whole
        lay = api.load_model(str(folder), device="cpu").info.layout
        assert lay.layer_query_heads == (4, 2, 4, 2)
        assert lay.barred == (("an MLA latent inside a sliding window", (1, 3)),)


def test_the_matrix_shrinks_per_layer_sizes_as_it_shrinks_shared_ones():
    """A tiny model keeps the differences between its layers (dots.3's sliding layers: half the heads, twice the
    latent), and a page's rows survive a rerun of some of them."""
    config = matrix.tiny_config("dots3_note_text")
    overrides = config.to_dict()["per_layer_config"]
    assert {k: v["num_attention_heads"] for k, v in overrides.items()} == {"1": 2, "3": 2}
    assert {k: v["kv_lora_rank"] for k, v in overrides.items()} == {"1": 32, "3": 32}
    inkling = matrix.tiny_config("inkling_text")
    assert (inkling.swa_num_attention_heads, inkling.swa_num_key_value_heads) == (4, 4)  # 64 / 16 of 64 / 8
    rows = [matrix.Row("a", "GQA", "works", "", 0.0), matrix.Row("b", "?", "refused", "why | not", 0.0),
            matrix.Row("c", "GQA", "scores only", "no compression", 0.0)]
    text = matrix.page(rows, "5", 3, "abc1234", reruns=[("def5678", ["b", "c"])])
    assert "**1 work (33%), 1 score their heads and refuse compression in one line, 1 are refused" in text
    at, back, reruns = matrix.read_page(text)
    assert at == "abc1234" and [(r.model_type, r.status, r.reason) for r in back] == [
        ("a", "works", ""), ("b", "refused", "why / not"), ("c", "scores only", "no compression")]
    assert reruns == [("def5678", ["b", "c"])]


def test_attention_written_inline_is_read_from_its_softmax_and_compressed_there(built, tmp_path):
    """Bloom computes attention inline (ALiBi, matmuls, a softmax): the softmax after each cache update is read as
    that layer's rows (eager's own attention, decoding over headprof's scoring cache), its heads are scored, and it
    is compressed: a budget above the prompt answers as the full cache does, a small one holds fewer bytes."""
    import json

    from transformers import DynamicCache

    from headprof import capture
    from headprof.calls import with_cache
    from headprof.kv.decode_cache import alone

    folder = built("bloom")
    lm = models.load(str(folder), device="cpu")
    assert lm.info.layout.inline == (0, 1, 2, 3) and lm.attn_implementation.startswith("eager")
    ids = torch.tensor([[3 + (i * 7) % 90 for i in range(30)]])
    rows: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        cache = alone(lm.model.config)
        lm.model(ids[:, :-1], **with_cache(lm.model, cache))
        with capture.AttentionCapture(rows.__setitem__, last_n=1):
            lm.model(ids[:, -1:], **with_cache(lm.model, cache))
        plain = DynamicCache(config=lm.model.config)
        lm.model(ids[:, :-1], **with_cache(lm.model, plain))
        eager = lm.model(ids[:, -1:], **with_cache(lm.model, plain), output_attentions=True).attentions
    assert sorted(rows) == [0, 1, 2, 3]
    for i in rows:
        torch.testing.assert_close(rows[i], eager[i][:, :, -1:].float(), atol=1e-6, rtol=1e-5)
    prof = api.score(lm, "retrieval", lengths=[200], depths=1, filter_probes=False, teacher_forced=True,
                     chat_template=False, batch_size=2)
    assert prof.shape == (4, 4) and np.isfinite(prof.query_scores()).all()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen")

    def run(method: str, budget: int) -> dict:
        r = CliRunner().invoke(app, ["run", str(prompt), "--model", str(folder), "--budget", str(budget),
                                     "--method", method, "--max-new-tokens", "8", "--min-new-tokens", "8", "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)

    for method in ("snapkv", "adakv"):
        (whole, full), (small, _) = run(method, 4096)["runs"], run(method, 24)["runs"]
        assert whole["tokens"] == full["tokens"] and whole["method"] == method and full["method"] == "full"
        assert small["kv_bytes"] < whole["kv_bytes"]


def test_inline_attention_headprof_cannot_read_is_refused_in_one_line(built, tmp_path):
    """Inline attention over a cache that holds more keys than tokens (CPM-Ant's prompt slots), or that does not
    decode with a mask (XLM): refused in one line by `score`, nothing written."""
    for model_type, why in [("cpmant", "cache other than one key per token"),
                            ("xlm", "does not decode over a cache with a mask")]:
        out = tmp_path / f"{model_type}.json"
        r = CliRunner().invoke(app, ["score", str(built(model_type)), "--method", "retrieval", "--lengths", "200",
                                     "--depths", "1", "--out", str(out)])
        assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
        assert why in r.output and not out.exists()


def test_an_attention_free_model_is_refused_by_info(built):
    r = CliRunner().invoke(app, ["info", str(built("mamba"))])
    assert r.exit_code == 2 and "attention-free" in r.output and len(r.output.splitlines()) == 1


def test_a_hybrid_model_batch_scores_what_each_probe_scores_alone(built):
    lm = models.load(str(built("qwen3_next")), device="cpu")
    assert lm.info.layout.no_heads == (0, 2)  # its linear-attention layers
    jobs = []
    for seed, length in enumerate([40, 61, 55]):
        ids = torch.randint(3, 98, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        fam = families.get("disambiguation")
        jobs.append(ProbeJob(RenderedProbe(ids, (10, 17 + seed), ""), fam, Decoder(lm.tokenizer, set(), 3 + seed)))
    alone = [score_probe(lm, j.rendered, j.family, Decoder(lm.tokenizer, set(), j.decoder.cap)) for j in jobs]
    together = score_batch(lm, jobs)
    for a, b in zip(alone, together, strict=True):
        assert a.response == b.response
        np.testing.assert_allclose(b.scores, a.scores, atol=1e-5)
        assert (a.scores[[0, 2]] == 0).all() and (a.scores[[1, 3]] > 0).all()  # only attention layers score


def test_an_mla_layer_keeps_one_selection_of_its_latent(built):
    lm = models.load(str(built("deepseek_v3")), device="cpu")
    assert lm.info.layout.latent == (0, 1, 2, 3) and lm.info.layout.latent_dim == 16 + 8
    ids = [1] + [3 + (i * 7) % 90 for i in range(119)]
    report = api.generate(lm, ids, "snapkv", 40, max_new_tokens=4)
    small, full = report.runs
    assert small.kv_bytes < full.kv_bytes / 2
    assert any("share their kept tokens" in n for n in small.notes)
    assert all(len(set(b)) == 1 for b in small.budgets)  # every head of a layer: the same tokens


def test_sparse_attention_latents_keep_one_count_and_their_indexer_keys_follow(built):
    lm = models.load(str(built("glm_moe_dsa")), device="cpu")
    assert set(lm.info.layout.attention_kinds) == {"indexed_attention"} and lm.info.layout.reused_index == ()
    prof = api.score(str(built("glm_moe_dsa")), "r2", lengths=[240], depths=2, filter_probes=False,
                     teacher_forced=True, chat_template=False, device="cpu", batch_size=2)
    ids = [1] + [3 + (i * 7) % 90 for i in range(119)]
    from headprof import methods
    from headprof.compressing import generation

    m = methods.resolve("headkv", prof)
    cache = generation.cache_for(lm.info.layout, m, True, lm.model.config)
    plan = generation.make_plan(m, lm.info.layout, len(ids), 40, True)
    with generation.compressing(cache, m.window, lambda _: plan):
        generation._generate(lm, torch.tensor([ids]), cache, max_new_tokens=3)
    held = {layer.keys.shape[-2] for layer in cache.layers}
    assert len(held) == 1 and {layer.indexer_keys.shape[1] for layer in cache.layers} == held
    assert next(iter(held)) < len(ids)


def test_shared_positions_take_the_layers_mean_budget_by_votes():
    picks = [torch.tensor([1, 2, 5]), torch.tensor([2, 5, 7]), torch.tensor([2, 3, 5])]
    scores = torch.zeros(3, 8)
    scores[:, 7] = 1.0  # among the positions one head chose, the best-scored one wins the tie
    assert latent.shared_positions(picks, scores).tolist() == [2, 5, 7]


def test_a_hybrid_profile_does_not_fit_a_dense_model_of_the_same_grid():
    dense = layout.HeadLayout(4, 4, 2, 16, ("full_attention",) * 4, None)
    hybrid = layout.HeadLayout(4, 4, 2, 16, ("linear_attention", "full_attention") * 2, None, no_heads=(0, 2))
    prof = api.Profile({"model": {"spec": "tiny-hybrid", "num_layers": 4, "num_query_heads": 4, "num_kv_heads": 2,
                                  "layers_without_heads": [0, 2]}})
    prof.check_fits(hybrid)
    with pytest.raises(ProfileError, match=r"layers without attention heads are \[0, 2\]; this model's are none "
                                           r"\(layers 0, 2 differ\)"):
        prof.check_fits(dense)


def test_no_position_limit_is_not_a_limit():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=96, max_position_embeddings=-1)
    info = models._info("x", config, None, None, "x", False)
    assert info.max_positions == 0  # 0: no limit (generation and scoring check only a positive limit)


@pytest.mark.parametrize("model_type", ["qwen3_next", "falcon_h1", "deepseek_v3", "glm_moe_dsa", "minimax"])
def test_eval_cells_from_one_shared_prefill_equal_their_own_prefill(built, model_type):
    """eval builds every cell's cache from one prefill: a hybrid layer's state and an MLA latent come along."""
    from headprof.compressing import generation

    lm = models.load(str(built(model_type)), device="cpu")
    ids = [1] + [3 + (i * 7) % 90 for i in range(150)]
    shared = generation.prefill(lm, ids, 16)
    for method, budget in [("snapkv", 40), ("streaming", 40), ("full", 40)]:
        a = generation.generate(lm, ids, method, budget, max_new_tokens=6, shared=shared)
        b = generation.generate(lm, ids, method, budget, max_new_tokens=6)
        assert (a.tokens, a.kv_bytes) == (b.tokens, b.kv_bytes)


def test_layers_that_cache_different_kv_heads_group_budget_and_score_by_their_own_count(built):
    """MiMo-V2-Flash's sliding layers cache 4 KV heads, its full layers 2 (4 query heads): the grid is 4 wide, a full
    layer's KV heads 2 and 3 are absent (no budget, score 0), and each layer groups its query heads by its count."""
    lm = api.load_model(str(built("mimo_v2_flash")), device="cpu")
    lay = lm.info.layout
    assert lay.num_kv_heads == 4 and set(lay.layer_kv_heads) == {2, 4}
    full = [i for i in range(lay.num_layers) if lay.kv_heads(i) == 2]
    plan = compress.make_plan(methods.get("snapkv"), lay, 200, 40)
    assert (plan.budgets[full, 2:] == 0).all() and not plan.compressible[full, 2:].any()
    assert (plan.budgets[full, :2] > 0).all()
    query = np.arange(lay.num_layers * 4, dtype=float).reshape(lay.num_layers, 4)
    kv = Profile.kv_reduce(query, 4, list(lay.layer_kv_heads))["mean"]
    assert kv[full[0]] == [query[full[0], :2].mean(), query[full[0], 2:].mean(), 0, 0]
    r = api.generate(lm, "a b c d e f g h i j " * 8, method="snapkv", budget=40, max_new_tokens=2)
    assert [len(b) for b in r.runs[0].budgets] == [lay.kv_heads(i) for i in range(lay.num_layers)]
    assert r.runs[0].kv_bytes < r.runs[1].kv_bytes


def test_layers_whose_heads_differ_in_size_are_compressed_each_with_its_own(built, tmp_path):
    """Gemma 4's full-attention layers have heads twice the sliding layers' size: one grid of heads, each layer's
    size in the profile, bytes counted per layer, and a profile refused by a model whose sizes differ."""
    lm = api.load_model(str(built("gemma4_text")), device="cpu")
    lay = lm.info.layout
    sizes = [lay.head_size(i) for i in range(lay.num_layers)]
    assert set(sizes) == {16, 32} and lay.head_dim == 16
    assert [s == 32 for s in sizes] == [k == "full_attention" for k in lay.attention_kinds]
    r = api.generate(lm, "a b c d e f g h i j " * 8, method="snapkv", budget=40, max_new_tokens=2)
    small, full = r.runs
    n = full.prompt_tokens + 1  # the prompt and the token fed back
    assert full.kv_bytes_full == sum(n * lay.kv_heads(i) * 2 * sizes[i] * 4 for i in range(lay.num_layers))
    assert full.kv_bytes == full.kv_bytes_full and full.bytes_per_entry is None
    assert small.kv_bytes < full.kv_bytes and small.kv_bytes <= 1.05 * small.kv_bytes_ideal
    prof = api.score(lm, "retrieval", lengths=[200], depths=1, filter_probes=False, teacher_forced=True,
                     chat_template=False)
    assert prof.model["head_dim_per_layer"] == sizes
    path = tmp_path / "g4.json"
    prof.save(path)
    prompt = tmp_path / "p.txt"
    prompt.write_text("The key is under the pot. " * 20 + "Where is the key?")
    r = CliRunner().invoke(app, ["run", "--model", str(built("gemma3_text")), "--profile", str(path),
                                 "--budget", "32", "--max-new-tokens", "2", "--json", str(prompt)])
    full_layers = ", ".join(str(i) for i, s in enumerate(sizes) if s == 32)
    assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
    assert f"heads in layers {full_layers} have size 32; this model's have 16" in r.output


@pytest.mark.parametrize("kind", ["heavily_compressed_attention", "compressed_sparse_attention"])
def test_a_block_layer_row_hands_each_entry_to_its_tokens(kind):
    """DeepSeek-V4's rows: window keys first (at their positions), then one key per compressed entry."""
    from types import SimpleNamespace

    from headprof.kv.blocks import token_rows

    layer = SimpleNamespace(cumulative_length=14, entry_count={"compressor": 3}, compress_rate=4)
    probs = torch.tensor([0.1, 0.2, 0.1, 0.0, 0.2, 0.4]).view(1, 1, 1, 6)  # 3 window keys, 3 entries
    rows = token_rows(probs, layer, kind)[0, 0, 0]
    window = [0.0] * 11 + [0.1, 0.2, 0.1]  # the window: the last 3 positions (the entries overlap it)
    if kind == "heavily_compressed_attention":  # entry e: tokens 4e .. 4e + 3, a quarter each
        entries = [0.0] * 4 + [0.05] * 4 + [0.1] * 4 + [0.0] * 2
    else:  # entry 0: tokens 0-3, a quarter each; entry e >= 1: tokens 4(e - 1) .. 4e + 3, an eighth each
        entries = [0.2 / 8] * 4 + [0.2 / 8 + 0.4 / 8] * 4 + [0.4 / 8] * 4 + [0.0] * 2
    assert rows.tolist() == pytest.approx([a + b for a, b in zip(window, entries, strict=True)])
    assert rows.sum().item() == pytest.approx(1.0)  # a row keeps its mass


def test_deepseek_v4_scores_its_heads_exactly_and_compresses_its_window(built, tmp_path):
    """One shared KV head per layer, a window of 128 tokens and compressed entries after it, learned sinks: headprof
    computes what the model's eager attention computes (past the window, decoding), scores every head through its
    block rows, and compresses each layer's window (its blocks kept as the model makes them): the logits are the
    model's own attention over the kept window tokens and every block, and a budget of the window is the full cache."""
    folder = built("deepseek_v4")
    lm = models.load(str(folder), device="cpu")
    lay = lm.info.layout
    assert lay.num_kv_heads == 1 and set(lay.attention_kinds) == set(layout.BLOCK_KINDS)
    from transformers import DynamicCache

    from headprof import capture
    from headprof.calls import with_cache

    ids = torch.tensor([[3 + (i * 7) % 90 for i in range(300)]])  # past the window of 128: entries carry the rest

    def decode(name: str, rows: dict | None = None) -> tuple[torch.Tensor, tuple]:
        """Logits of the prompt and 3 decode steps, and the last step's attention (eager's, or headprof's rows)."""
        with capture.implementation(lm.model, name), torch.no_grad():
            cache = DynamicCache(config=lm.model.config)
            out = [lm.model(ids, **with_cache(lm.model, cache)).logits[:, -1]]
            for token in (5, 9, 11):
                with capture.AttentionCapture(rows.__setitem__) if rows is not None else contextlib.nullcontext():
                    step = lm.model(torch.tensor([[token]]), **with_cache(lm.model, cache),
                                    output_attentions=rows is None)
                out.append(step.logits[:, -1])
        return torch.stack(out), step.attentions

    rows: dict[int, torch.Tensor] = {}
    ours, _ = decode(capture.BLOCKS, rows)
    theirs, attentions = decode("eager")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for i in range(lay.num_layers):  # 128 window keys, then 2 heavily compressed or 75 compressed-sparse entries
        assert rows[i].shape[-1] == 128 + (2 if lay.attention_kinds[i] == "heavily_compressed_attention" else 75)
        torch.testing.assert_close(rows[i], attentions[i].float(), atol=1e-6, rtol=1e-5)
    prof = api.score(str(folder), "r2", lengths=[400], depths=2, filter_probes=False, teacher_forced=True,
                     chat_template=False, device="cpu", batch_size=2)
    scores = prof.query_scores()
    assert scores.shape == (4, 4) and np.isfinite(scores).all() and (scores > 0).any(axis=1).all()
    compress_window(lm, ids)
    (tmp_path / "prompt.txt").write_text("a b c d e f g h " * 40)
    r = CliRunner().invoke(app, ["run", "--model", str(folder), "--method", "snapkv:window=8", "--budget", "128",
                                 "--no-chat-template", "--json", str(tmp_path / "prompt.txt")])
    assert r.exit_code == 0, r.output
    import json

    ours, full = json.loads(r.output)["runs"]
    assert ours["tokens"] == full["tokens"]
    # the window counted once (its keys are its values), the blocks' state in full and held bytes alike
    assert abs(full["kv_bytes"] - full["kv_bytes_full"]) <= 0.01 * full["kv_bytes_full"]
    assert ours["kv_bytes_full"] == full["kv_bytes_full"]
    r = CliRunner().invoke(app, ["run", "--model", str(folder), "--method", "split", "--budget", "128",
                                 "--no-chat-template", str(tmp_path / "prompt.txt")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    r = CliRunner().invoke(app, ["eval", str(folder), "--methods", "full,snapkv", "--budgets", "64", "--lengths",
                                 "300", "--items", "1", "--out", str(tmp_path / "eval")])
    assert r.exit_code == 0, r.output  # each compressed cell prefills for itself
    from headprof.compressing import generation
    from headprof.errors import HeadprofError

    with pytest.raises(HeadprofError, match="compressors cannot continue"):  # kvpress's protocol: context first
        generation.generate(lm, ids[0].tolist(), "snapkv", 64, max_new_tokens=2, question_start=280)


def compress_window(lm, ids: torch.Tensor) -> None:
    """SnapKV at a budget under DeepSeek-V4's window against a reference: the model's own cache, its attention
    hiding, at each decode step, the prompt positions the compressed layer dropped."""
    import headprof
    from headprof import capture
    from headprof.kv.cache import HeadKVCache, held_bytes

    kept: dict[int, set[int]] = {}
    compress = HeadKVCache.compress

    def record(self, layer, keep):
        kept[layer] = set(keep[0].tolist())
        compress(self, layer, keep)

    n = ids.shape[1]
    with pytest.MonkeyPatch.context() as m, torch.no_grad():
        m.setattr(HeadKVCache, "compress", record)
        with headprof.compression(lm.model, "snapkv", budget=48) as cache:
            out = lm.model.generate(ids, cache=cache, max_new_tokens=12, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
        assert sorted(kept) == [0, 1, 2, 3] and all(len(k) == 48 for k in kept.values())
        held = cache.nbytes()

    def hide_dropped(module, attention_mask):
        layer = module.layer_idx
        own = ref.layers[layer]
        entries = own.compressed_kv["compressor"]
        window = attention_mask.shape[-1] - (0 if entries is None else entries.shape[1])
        pos = own.cumulative_length - window + torch.arange(attention_mask.shape[-1])
        dropped = (pos < n) & ~torch.isin(pos, torch.tensor(sorted(kept[layer]))) & (torch.arange(len(pos)) < window)
        if attention_mask.shape[-2] > 1:  # the prefill reads every token, as the compressed cache's prefill does
            return attention_mask
        return attention_mask.masked_fill(dropped, float("-inf"))

    from transformers import DynamicCache

    ref = DynamicCache(config=lm.model.config)
    with pytest.MonkeyPatch.context() as m, torch.no_grad():
        m.setattr(capture, "_held_only", hide_dropped)
        theirs = lm.model.generate(ids, cache=ref, max_new_tokens=12, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(theirs.logits), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = lm.model.generate(ids, cache=DynamicCache(config=lm.model.config), max_new_tokens=12,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
    assert not torch.allclose(torch.stack(out.logits), torch.stack(full.logits), atol=1e-3)  # it dropped something
    assert held < held_bytes(ref)


def test_one_softmax_run_twice_is_scored_once_and_never_compressed(built, tmp_path):
    """DiffLlama runs each layer's softmax twice, over the two halves of its values: its rows are handed over once
    per layer and step (a sink that counts them would count twice), they are eager's rows, and compressing it is
    refused in one line naming the layers, with nothing written."""
    from transformers import DynamicCache

    from headprof import capture
    from headprof.calls import with_cache

    folder = built("diffllama")
    lm = models.load(str(folder), device="cpu")
    ids = torch.tensor([[3 + (i * 7) % 90 for i in range(40)]])
    calls: list[tuple[int, torch.Tensor]] = []
    with torch.no_grad(), capture.AttentionCapture(lambda layer, p: calls.append((layer, p)), last_n=2):
        lm.model(ids, **with_cache(lm.model, DynamicCache(config=lm.model.config)))
    assert [layer for layer, _ in calls] == list(range(lm.info.layout.num_layers))
    with capture.implementation(lm.model, "eager"), torch.no_grad():
        eager = lm.model(ids, output_attentions=True).attentions
    for layer, probs in calls:
        torch.testing.assert_close(probs, eager[layer][:, :, -2:].float(), atol=1e-5, rtol=1e-4)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("one two three four five six seven eight nine ten eleven twelve")
    r = CliRunner().invoke(app, ["run", str(prompt), "--model", str(folder), "--budget", "24", "--method", "snapkv"])
    assert r.exit_code == 2 and len(r.output.splitlines()) == 1, r.output
    assert "one softmax run twice over values other than the cache's in layers 0, 1, 2, 3" in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["prompt.txt"]


def test_a_barred_layer_beside_compressible_ones_is_kept_as_the_model_keeps_it(built, tmp_path):
    """Kolibri's indexed layer attends over rounded copies of its cached keys (no compressed cache could serve it):
    it keeps every token in the model's own cache layer while its sliding layers are compressed, a budget above the
    prompt answers as the full cache does, and the run says which layer was kept and why."""
    import json

    folder = built("kolibri1_1")
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen")

    def run(budget: int) -> dict:
        r = CliRunner().invoke(app, ["run", str(prompt), "--model", str(folder), "--budget", str(budget),
                                     "--method", "snapkv", "--max-new-tokens", "6", "--min-new-tokens", "6", "--json"])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)["runs"]

    (whole, full), (small, _) = run(4096), run(20)
    assert whole["tokens"] == full["tokens"] and small["kv_bytes"] < whole["kv_bytes"]
    assert "not compressed: keys other than those the cache returned in layer 1" in " ".join(small["notes"])
    assert small["budgets"][1] == [0] * len(small["budgets"][1]) and any(small["budgets"][0])


def test_layers_whose_query_heads_differ_are_scored_and_compressed_each_with_its_own(tmp_path):
    """Inkling's sliding layers have query and KV heads of their own (here 2 and 1 beside 4 and 2): one grid as wide
    as the widest layer, each layer's query heads scored and grouped by its own counts, each KV head reading its own
    query heads (a budget above the prompt gives the full cache's tokens), and a profile of other counts refused."""
    config = matrix.tiny_config("inkling_text")
    config.swa_num_attention_heads, config.swa_num_key_value_heads = 2, 1
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.save_pretrained(tmp_path / "m")
    matrix.char_tokenizer().save_pretrained(tmp_path / "m")
    lm = api.load_model(str(tmp_path / "m"), device="cpu")
    lay = lm.info.layout
    sliding = [k == "hybrid_sliding" for k in lay.attention_kinds]
    assert lay.layer_query_heads == tuple(2 if s else 4 for s in sliding) and lay.num_query_heads == 4
    assert lay.layer_kv_heads == tuple(1 if s else 2 for s in sliding)
    ids = [1] + [3 + (i * 7) % 90 for i in range(119)]
    for method in ("snapkv", "adakv"):
        big = api.generate(lm, ids, method, len(ids) + 8, max_new_tokens=6)
        assert big.runs[0].tokens == big.runs[1].tokens
    small = api.generate(lm, ids, "snapkv", 24, max_new_tokens=4)
    assert [len(b) for b in small.runs[0].budgets] == list(lay.layer_kv_heads)
    assert small.runs[0].kv_bytes < small.runs[1].kv_bytes
    prof = api.score(lm, "r2", lengths=[240], depths=2, filter_probes=False, teacher_forced=True,
                     chat_template=False)
    assert prof.model["query_heads_per_layer"] == list(lay.layer_query_heads)
    q = prof.query_scores()
    assert (q[sliding][:, 2:] == 0).all() and (q[~np.array(sliding)] > 0).any()
    kv = prof.kv_scores("mean")
    np.testing.assert_allclose(kv[sliding][:, 0], q[sliding][:, :2].mean(-1), atol=1e-6)
    assert (kv[sliding][:, 1] == 0).all()
    path = tmp_path / "p.json"
    prof.save(path)
    other = dataclasses.replace(lay, layer_query_heads=(), layer_kv_heads=())
    with pytest.raises(ProfileError, match="query heads"):
        Profile.load(path).check_fits(other)
    api.generate(lm, ids, "headkv", 40, profile=Profile.load(path), max_new_tokens=2)
    out = tmp_path / "headkv.json"
    r = CliRunner().invoke(app, ["export", str(path), "--format", "headkv", "--out", str(out)])
    assert r.exit_code == 2 and "one number of query heads in every layer" in r.output, r.output
    assert not out.exists()
