"""Heatmaps, compare, show, import/export and check."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headprof.artefacts import compare, interop, plots, profile
from headprof.errors import OutputError, ProfileError

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference is absent (reference files)")
SMOL = Path(__file__).resolve().parents[1] / "profiles" / "smollm2-135m" / "retrieval.json"


def headprof(*args):
    return subprocess.run([sys.executable, "-m", "headprof", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def permuted(p: profile.Profile, seed: int = 0) -> profile.Profile:
    d = json.loads(json.dumps(p.data))
    q = np.asarray(d["scores"]["query"])
    perm = np.random.default_rng(seed).permutation(q.size)
    d["scores"]["query"] = q.ravel()[perm].reshape(q.shape).tolist()
    for r in d["probes"]:
        r["scores"] = np.asarray(r["scores"]).ravel()[perm].reshape(q.shape).tolist()
    return profile.Profile(d)


def test_compare_identical_and_permuted():
    p = profile.load(SMOL)
    same = compare.compare(p, p)
    assert same.spearman == pytest.approx(1.0) and same.kendall == pytest.approx(1.0)
    assert same.top10_overlap == 1.0 and same.kept_jaccard == 1.0 and same.within_noise
    other = compare.compare(p, permuted(p))
    assert other.spearman < 0.3 and other.top10_overlap < 0.3 and other.within_noise is False
    assert other.moved[0]["rank_a"] != other.moved[0]["rank_b"]


def test_rank_statistics_by_hand():
    assert compare.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert compare.kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert compare.ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert compare.mass_in_top(np.array([9.0] + [1.0] * 9), 0.1) == pytest.approx(0.5)


def test_compare_refuses_other_methods_and_shapes(tmp_path):
    p = profile.load(SMOL)
    d = json.loads(json.dumps(p.data))
    d["method"]["name"] = "r2"
    with pytest.raises(ProfileError, match="different methods"):
        compare.compare(p, profile.Profile(d))
    assert compare.compare(p, profile.Profile(d), force=True).spearman == pytest.approx(1.0)
    d["environment"]["transformers"], d["probe_set"]["hash"] = "4.0.0", "other"
    with pytest.raises(ProfileError, match=r"provenance differs: probe_set.hash: \S+ vs other, "
                                           r"environment.transformers: \S+ vs 4.0.0"):
        compare.compare(p, profile.Profile(d))
    assert compare.compare(p, profile.Profile(d), force=True).provenance == [
        f"probe_set.hash: {p.probe_set['hash']} vs other", f"environment.transformers: "
        f"{p.environment['transformers']} vs 4.0.0"]
    assert compare.compare(p, p).provenance == []
    kv_only = profile.Profile({**d, "scores": {**d["scores"], "query": None}})
    with pytest.raises(ProfileError, match="KV-head scores only"):
        compare.compare(p, kv_only)


@pytest.mark.parametrize("ext", [".png", ".svg", ".pdf"])
def test_heatmap_files(tmp_path, ext):
    p = profile.load(SMOL)
    out = plots.save_heatmap(p, tmp_path / f"h{ext}", top=5)
    assert out.stat().st_size > 1000
    if ext == ".png":
        w, h = Image.open(out).size
        assert 400 < w < 2000 and 400 < h < 2000 and h > w  # 30 layers x 9 heads: taller than wide


def test_heatmap_kv_and_diff_and_terminal(tmp_path):
    p = profile.load(SMOL)
    assert Image.open(plots.save_heatmap(p, tmp_path / "kv.png", kv=True)).size[0] > 300
    assert Image.open(plots.save_heatmap(p, tmp_path / "d.png", other=permuted(p))).size[0] > 300
    from rich.console import Console

    console = Console(record=True, width=120)
    console.print(plots.terminal_heatmap(p, top=3))
    text = console.export_text()
    q = p.query_scores()
    layer, head = np.unravel_index(int(np.argmax(q)), q.shape)
    assert "L29" in text and f"top: L{layer}H{head} " in text
    with pytest.raises(OutputError, match="extension"):
        plots.save_heatmap(p, tmp_path / "h.jpg")


@needs_reference
@pytest.mark.parametrize("name", ["Meta-Llama-3-8B-Instruct_retrieval_heads.json",
                                  "Mistral-7B-Instruct-v0.2_retrieval_reasoning_heads.json"])
def test_headkv_round_trip_on_reference_files(tmp_path, name):
    src = REFERENCE / name
    p = interop.import_headkv(src, "ref-model", kv_heads=8)
    raw = json.loads(src.read_text())
    assert p.shape == (32, 32) and p.model["num_kv_heads"] == 8
    assert p.query_scores()[3, 7] == pytest.approx(np.mean(raw["3-7"]), abs=1e-8)
    assert len(p.data["probes"]) == len(raw["0-0"]) and p.data["source"]["unknown"]
    (tmp_path / "back.json").write_text(interop.export_text(p, "headkv"))
    again = interop.import_headkv(tmp_path / "back.json", "ref-model", kv_heads=8)
    np.testing.assert_allclose(again.query_scores(), p.query_scores(), atol=1e-8)
    back = json.loads((tmp_path / "back.json").read_text())
    np.testing.assert_allclose(back["31-31"], raw["31-31"], atol=1e-8)
    assert Image.open(plots.save_heatmap(p, tmp_path / "ref.png")).size[0] > 800  # 32 x 32 stays readable


@needs_reference
def test_duo_round_trip_on_reference_file(tmp_path):
    src = REFERENCE / "duoattention_Mistral-7B-Instruct-v0.2_full_attention_heads.tsv"
    p = interop.import_duo(src, "mistral", query_heads=32)
    kv = p.kv_scores("mean")
    assert kv.shape == (32, 8) and kv.min() >= 0 and kv.max() <= 1
    raw = np.loadtxt(src)
    np.testing.assert_allclose(kv, np.clip(raw, 0, 1), atol=1e-8)
    (tmp_path / "back.tsv").write_text(interop.export_text(p, "duo"))
    np.testing.assert_allclose(interop.import_duo(tmp_path / "back.tsv", "mistral", 32).kv_scores("mean"), kv,
                               atol=1e-12)


@pytest.mark.parametrize("content,fmt,message", [
    ("1\t2\n3\n", "duo", "ragged rows"),
    ("1\tx\n", "duo", "must be a number"),
    ('{"0-0": [1], "0-1": [1], "1-0": [1]}', "headkv", "full 2 x 2"),
    ('{"a-b": [1]}', "headkv", "not 'layer-head'"),
    ("{nope", "headkv", "not valid JSON"),
])
def test_import_bad_files(tmp_path, content, fmt, message):
    f = tmp_path / "f"
    f.write_text(content)
    with pytest.raises(ProfileError, match=message):
        interop.import_file(f, fmt, "m")


def test_cli_artefact_commands_and_bad_inputs(tmp_path):
    r = headprof("show", SMOL)
    assert r.returncode == 0 and "split-half" in r.stdout and "95% interval" in r.stdout
    r = headprof("compare", SMOL, SMOL, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["spearman"] == pytest.approx(1.0)
    r = headprof("heatmap", SMOL)
    assert r.returncode == 0 and "L23" in r.stdout
    r = headprof("export", SMOL, "--format", "headkv", "--out", tmp_path / "e.json")
    assert r.returncode == 0
    r = headprof("import", tmp_path / "e.json", "--format", "headkv", "--model-id", "smol", "--kv-heads", "3",
                 "--out", tmp_path / "i.json")
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(profile.load(tmp_path / "i.json").query_scores(), profile.load(SMOL).query_scores(),
                               atol=1e-7)
    (tmp_path / "corrupt.json").write_text("{")
    newer = json.loads(SMOL.read_text())
    newer["schema_version"] = 9
    (tmp_path / "newer.json").write_text(json.dumps(newer))
    for args, words in [(["show", tmp_path / "missing.json"], "not found"),
                        (["show", tmp_path / "corrupt.json"], "not valid JSON"),
                        (["heatmap", tmp_path / "newer.json"], "newer"),
                        (["heatmap", SMOL, "-o", tmp_path / "x.bmp"], "extension"),
                        (["heatmap", SMOL, "-o", "/proc/nope/x.png"], "cannot create"),
                        (["export", SMOL, "--format", "csv"], "unknown format"),
                        (["import", tmp_path / "e.json", "--format", "duo", "--model-id", "m", "-o",
                          tmp_path / "d.json"], "number")]:
        r = headprof(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr and words in r.stderr, (args, r.stderr)


def _disable_top_heads(model_dir: Path, prof: profile.Profile, out: Path, n: int = 3) -> Path:
    """The same model with its n most important query heads' queries zeroed (uniform attention)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    q = prof.query_scores()
    dim = m.config.hidden_size // m.config.num_attention_heads if not getattr(m.config, "head_dim", None) \
        else m.config.head_dim
    with torch.no_grad():
        for i in np.argsort(-q.ravel())[:n]:
            layer, head = divmod(int(i), q.shape[1])
            m.model.layers[layer].self_attn.q_proj.weight[head * dim:(head + 1) * dim] = 0
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


def test_check_passes_on_rescore_and_fails_on_changed_model(tmp_path):
    from tiny import save

    model_dir = save("llama", tmp_path / "tiny")
    prof_path = tmp_path / "p.json"
    r = headprof("score", model_dir, "--method", "r2", "--lengths", "200,300", "--depths", "3", "--out", prof_path,
                 "--one-round", "--max-new-tokens", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    made = profile.load(prof_path)
    assert made.environment["tokenizers"] and made.environment["headprof"] == made.data["headprof_version"]
    assert made.data["headprof_version"].startswith(profile.package_version().split("+")[0])
    r = headprof("check", prof_path, "--quiet")
    assert r.returncode == 0 and "OK" in r.stdout and "Spearman 1.000" in r.stdout, r.stdout + r.stderr
    assert "provenance differs" not in r.stdout
    r = headprof("check", prof_path, "--max-probes", "2", "--quiet")  # a subset: the same probes, not a new set
    assert r.returncode == 0 and "provenance differs" not in r.stdout, r.stdout + r.stderr
    changed = _disable_top_heads(model_dir, profile.load(prof_path), tmp_path / "changed")
    r = headprof("check", prof_path, "--model", changed, "--quiet")
    assert r.returncode == 1 and "FAIL" in r.stdout, r.stdout + r.stderr
    assert "provenance differs from the profile's run: model.resolved: " in r.stdout, r.stdout
    assert "model.weights_sha256: " in r.stdout and made.model["weights_sha256"], r.stdout  # the weights' hash


def test_rankings_skip_cells_that_are_not_heads(tmp_path):
    """A grid cell that is no head (a layer without heads, a layer's query heads beyond its own count) scores 0 and
    is left out of `show`'s ranking and `compare`'s statistics: here A and B rank their real heads the same way and
    differ only where the empty cells' zeros would have tied with a real head."""
    query = np.array([[0.9, 0.2, 0.5, 0.4], [0.7, 0.1, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    model = {"spec": "toy", "num_layers": 3, "num_query_heads": 4, "num_kv_heads": 2,
             "query_heads_per_layer": [4, 2, 4], "kv_heads_per_layer": [2, 1, 2], "layers_without_heads": [2]}
    a = profile.build(model, "r2", {}, {"name": "toy"}, [], query, {})
    assert a.present().tolist() == [[True] * 4, [True, True, False, False], [False] * 4]
    assert a.present("kv").tolist() == [[True, True], [True, False], [False, False]]
    assert a.kv_scores().tolist()[1] == [0.4, 0.0]
    assert [r["head"] for r in compare.summarise(a, top=10).top] == ["L0H0", "L1H0", "L0H2", "L0H3", "L0H1", "L1H1"]
    lower = query - 0.05 * (query > 0)
    lower[1, 1] = 0.0  # still B's last head; among the empty cells' zeros it would tie with them
    b = profile.build(model, "r2", {}, {"name": "toy"}, [], lower, {})
    c = compare.compare(a, b)
    assert c.spearman == pytest.approx(1.0) and c.kendall == pytest.approx(1.0)
    assert {m["head"] for m in c.moved} <= {"L0H0", "L0H1", "L0H2", "L0H3", "L1H0", "L1H1"}
    image = plots.save_heatmap(a, tmp_path / "toy.png", top=3)
    assert Image.open(image).size[0] > 0
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(plots.terminal_heatmap(a, top=3))
    text = console.export_text()
    assert "top: L0H0 0.9, L1H0 0.7, L0H2 0.5" in text and text.count("··") == 4 + 2 + 1  # L2, L1H2-3, legend
