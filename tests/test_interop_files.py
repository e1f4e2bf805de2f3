"""Profiles other tools read, checked the way those tools read them: DuoAttention's and RLKV's pattern folder, and
NVIDIA kvpress's LUKVPress budget curve."""

import json

import numpy as np
import pytest
import torch
from fakes import loaded

from headprof import api, methods
from headprof.artefacts import interop
from headprof.artefacts.profile import Profile
from headprof.compressing import generation
from headprof.errors import ProfileError


def _duo_loader(folder):
    """What DuoAttention's `load_attn_pattern` and RLKV's `_load_rlkv_head_masks` read from a pattern folder (read
    off their sources): a tab-separated layers x KV heads table clipped to [0, 1], and config.json's sizes."""
    table = np.clip(np.loadtxt(folder / "full_attention_heads.tsv", dtype=float, delimiter="\t"), 0, 1)
    config = json.loads((folder / "config.json").read_text())
    return table, config["sink_size"], config["recent_size"]


def test_a_duo_table_round_trips_through_the_folder_their_loaders_read(tmp_path):
    table = np.array([[0.91, 0.05], [0.0, 1.0], [0.33, 0.47]])  # numbers only, in their layout: layers x KV heads
    (tmp_path / "in.tsv").write_text("\n".join("\t".join(f"{v:.6f}" for v in row) for row in table) + "\n")
    prof = interop.import_duo(tmp_path / "in.tsv", "some/model", query_heads=4)
    api.export_files(prof, "duo", tmp_path / "pattern", sink=64, recent=256)
    back, sink, recent = _duo_loader(tmp_path / "pattern")
    assert back.shape == (3, 2) and (sink, recent) == (64, 256)
    assert np.allclose(back, table, atol=1e-6)  # already in [0, 1] with a 1: unchanged
    # the heads a quantile threshold keeps (RLKV's --rlkv-sparsity) are the profile's top KV heads
    assert set(zip(*np.nonzero(back >= np.quantile(back, 0.5)), strict=True)) == {(0, 0), (1, 1), (2, 1)}


def test_an_r2_profile_exports_in_range_and_in_its_own_order(tmp_path):
    prof = Profile.load("profiles/smollm2-135m/r2.json")
    api.export_files(prof, "duo", tmp_path / "smol")
    back, _, _ = _duo_loader(tmp_path / "smol")
    kv = prof.kv_scores("mean")
    assert back.shape == kv.shape and back.max() == pytest.approx(1.0) and back.min() >= 0
    assert (np.argsort(back, axis=None, kind="stable") == np.argsort(kv, axis=None, kind="stable")).all()


def _lukv_keep(prune: np.ndarray, seq: int) -> np.ndarray:
    """The per-head keep counts LUKVPress derives from one layer's row of its curve (kvpress 0.5.5's arithmetic, read
    off its source): (1 - prune) x seq, floored, the rounded total's remainder given to the largest fractions."""
    ideal = (1 - prune.astype(np.float32)) * seq
    total = int(np.round(ideal.sum()))
    keep = np.floor(ideal).astype(int)
    for i in np.argsort(-(ideal - keep), kind="stable")[:max(0, total - keep.sum())]:
        keep[i] += 1
    return np.clip(keep, 1, seq)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9, 0.97])
def test_the_lukv_curve_gives_kvpress_the_counts_headkv_keeps(ratio, tmp_path):
    lm = loaded("llama")
    lay = lm.info.layout
    scores = np.random.default_rng(7).random((lay.num_layers, lay.num_query_heads)) ** 3
    prof = Profile({"model": {"spec": "tiny", "num_layers": lay.num_layers, "num_query_heads": lay.num_query_heads,
                              "num_kv_heads": lay.num_kv_heads, "group_size": lay.group_size},
                    "method": "r2", "scores": {"query": scores.tolist(),
                                               "kv": Profile.kv_reduce(scores, lay.num_kv_heads)}})
    n = 400
    curve = interop.lukv_curve(prof, n, window=16, beta=1.2)
    assert curve.shape == (99, lay.num_layers, lay.num_kv_heads) and curve.dtype == np.float32
    budget = max(17, round((1 - ratio) * n))
    ids = torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    run = generation.generate(lm, ids, methods.build("headkv", profile=prof, window=16), budget, max_new_tokens=1)
    kept = np.array(run.budgets) + 16
    t = round(ratio * 100) - 1
    assert all((_lukv_keep(curve[t, layer], n) == kept[layer]).all() for layer in range(lay.num_layers))


def test_formats_that_cannot_hold_the_profile_are_refused_and_nothing_is_written(tmp_path):
    base = {"num_layers": 2, "num_query_heads": 4, "num_kv_heads": 2, "group_size": 2}
    scores = np.ones((2, 4))
    kv = Profile.kv_reduce(scores, 2)
    latent = Profile({"model": {**base, "latent_layers": [0, 1]}, "method": "r2",
                      "scores": {"query": scores.tolist(), "kv": kv}})
    for fmt in ("lukv", "duo"):
        with pytest.raises(ProfileError, match="MLA latent"):
            api.export_files(latent, fmt, tmp_path / f"out.{fmt}", prompt_length=100)
    mixed = Profile({"model": {**base, "kv_heads_per_layer": [2, 1]}, "method": "r2",
                     "scores": {"query": scores.tolist(), "kv": kv}})
    with pytest.raises(ProfileError, match="one KV-head count for every layer"):
        api.export_files(mixed, "lukv", tmp_path / "out.npy", prompt_length=100)
    assert list(tmp_path.iterdir()) == []
