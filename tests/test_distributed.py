"""Scoring and eval sharded over processes (gloo on CPU): the same results as one process, resumable, no hangs."""

import datetime as dt
import json
import os
import socket
import subprocess
import sys

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import save

from headprof import models
from headprof import partial as partial_mod
from headprof.distributed import World
from headprof.errors import HeadprofError
from headprof.probing import probes, scoring

SETTINGS = scoring.Settings("retrieval", filter_probes=False, max_new_tokens=8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return str(save("llama", tmp_path_factory.mktemp("tiny") / "llama"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe_set():
    return probes.build_probe_set("retrieval", [150, 200], 3, seed=0)


def _worker(rank, size, port, tiny_dir, partial_dir, stop_rank, results, fail_rank):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=dt.timedelta(seconds=15))
    world = World(rank, size)
    try:
        if fail_rank is not None:  # one process cannot load the model: every process must stop
            try:
                world.agree(HeadprofError("model not found") if rank == fail_rank else None)
            except HeadprofError as e:
                results[rank] = str(e)
            return
        lm = models.load(tiny_dir, device="cpu")
        out = os.path.join(partial_dir, "p.json")
        partial = partial_mod.path_for(__import__("pathlib").Path(out), world)

        def stop(p):
            if rank == stop_rank and p.done == 1:
                raise KeyboardInterrupt  # this process dies after its first probe

        try:
            prof = scoring.score(lm, _probe_set(), SETTINGS, probes.Haystack(0), partial=partial,
                                 resume=partial.exists(), progress=stop, world=world)
            results[rank] = json.dumps({"scores": prof.data["scores"], "probes": prof.data["probes"]})
        except (KeyboardInterrupt, RuntimeError):  # the survivor's wait for the dead process times out
            results[rank] = "died"
    finally:
        dist.destroy_process_group()


def _spawn(tiny_dir, tmp_path, stop_rank=None, fail_rank=None):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, _port(), tiny_dir, str(tmp_path), stop_rank, results, fail_rank), nprocs=2)
    return dict(results)


def test_killed_process_then_resume_gives_the_single_process_profile(tiny_dir, tmp_path):
    lm = models.load(tiny_dir, device="cpu")
    single = scoring.score(lm, _probe_set(), SETTINGS, probes.Haystack(0))
    expected = json.dumps({"scores": single.data["scores"], "probes": single.data["probes"]})
    died = _spawn(tiny_dir, tmp_path, stop_rank=1)
    assert died[1] == "died"
    kept = {p.name: len(p.read_text().splitlines()) - 1 for p in tmp_path.glob("p.json.partial.*")}
    assert kept["p.json.partial.rank1of2.jsonl"] == 1  # its finished probe was kept
    resumed = _spawn(tiny_dir, tmp_path)
    assert resumed[0] == resumed[1] == expected


def test_a_process_that_cannot_load_stops_every_process(tiny_dir, tmp_path):
    results = _spawn(tiny_dir, tmp_path, fail_rank=1)
    assert results == {0: "process 1 of 2: model not found", 1: "process 1 of 2: model not found"}


def torchrun(*args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_port()),
           "-m", "headprof", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_torchrun_two_processes_equal_one(tiny_dir, tmp_path):
    args = ["score", tiny_dir, "--method", "retrieval", "--lengths", "150,200", "--depths", "3", "--no-filter",
            "--max-new-tokens", "8", "--quiet"]
    r = torchrun(*args, "--out", tmp_path / "two.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote") == 1  # one process reports
    one = subprocess.run([sys.executable, "-m", "headprof", *args, "--out", tmp_path / "one.json"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert a["scores"] == b["scores"] and a["probes"] == b["probes"]
    assert (a["environment"]["processes"], b["environment"]["processes"]) == (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.json", "two.json"]  # no partial files left

    (tmp_path / "three.json.partial.jsonl").write_text("{}\n")  # left by a one-process run
    r = torchrun(*args, "--out", tmp_path / "three.json", "--resume", cwd=tmp_path)
    assert r.returncode != 0 and "another number of processes" in r.stderr
    assert (tmp_path / "three.json.partial.jsonl").read_text() == "{}\n"


def test_eval_over_two_processes_equals_one(tiny_dir, tmp_path):
    args = ["eval", tiny_dir, "--methods", "full,snapkv,pyramidkv", "--budgets", "24,64", "--window", "8",
            "--items", "3", "--lengths", "150", "--max-new-tokens", "4", "--quiet"]
    r = torchrun(*args, "--out", tmp_path / "two", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote") == 1  # one process writes and reports
    one = subprocess.run([sys.executable, "-m", "headprof", *args, "--out", tmp_path / "one"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert "processes" not in a and b.pop("processes") == 2

    def timeless(doc):  # wall time differs between runs; everything else must not
        for r in doc["rows"] + doc["summary"] + [x for rows in doc["by_task"].values() for x in rows]:
            r.pop("seconds")
        return doc

    assert len(a["rows"]) == 6 * 2 * (1 + 2) and timeless(a) == timeless(b)
