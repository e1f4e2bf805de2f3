"""The profile file: a versioned JSON record of per-head scores and where they came from.

The JSON Schema lives next to this module (`profile.schema.json`); `validate` checks the same rules
plus the ones a schema cannot express (score grids that match the model's head layout) and names the
first problem it finds. Writes are atomic: a reader never sees half a profile, and an existing file is
only replaced with `force`.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from headprof.errors import ProfileError
from headprof.files import check_output, read_text, write_atomic
from headprof.layout import layer_list

__all__ = ["Profile", "load", "save", "validate", "check_output", "write_atomic", "shipped", "build", "provenance",
           "provenance_diff", "package_version"]

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("profile.schema.json")
_TOP_KEYS = ("schema_version", "headprof_version", "created_at", "model", "method", "probe_set", "probes",
             "scores", "environment")
_MODEL_KEYS = ("spec", "num_layers", "num_query_heads", "num_kv_heads")


@dataclass
class Profile:
    """A loaded, validated profile. `data` is the JSON document; accessors give numpy views.

    `Profile.load(path)`, `profile.save(path)`, `Profile.shipped("smollm2-135m", "r2")`,
    `profile.check_fits(layout)`; `headprof.score(model, ...)` makes one. Callers read the document through
    the properties below, never through its JSON layout.
    """

    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read and validate a profile file; one-line ProfileError for anything wrong with it."""
        p = Path(path)
        text = read_text(p, "profile", ProfileError)
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile {p} is not valid JSON (line {e.lineno}: {e.msg})") from None
        try:
            validate(d)
        except ProfileError as e:
            raise ProfileError(f"{p}: {e}") from None
        return cls(d)

    @classmethod
    def shipped(cls, model_spec: str, method: str = "r2") -> Profile | None:
        """The profile headprof ships for a model alias, or None."""
        path = shipped(model_spec, method)
        return cls.load(path) if path is not None else None

    def save(self, path: str | Path, force: bool = False) -> Path:
        """Validate and write atomically; an existing file is only replaced with `force`."""
        validate(self.data)
        return write_atomic(path, json.dumps(self.data, indent=1) + "\n", force)

    def check_fits(self, layout) -> None:
        """Refuse a profile made for a model with another head layout (`layout`: layout.HeadLayout), or whose layers
        with heads are not this model's (a hybrid model's profile on a dense one, or the other way round)."""
        m = self.model
        theirs = (m["num_layers"], m["num_query_heads"], m["num_kv_heads"])
        ours = (layout.num_layers, layout.num_query_heads, layout.num_kv_heads)
        if theirs == ours and list(m.get("query_heads_per_layer") or []) != list(layout.layer_query_heads):
            raise ProfileError(f"profile was made for {m.get('spec', 'another model')}, whose layers have "
                               f"{m.get('query_heads_per_layer') or theirs[1]} query heads; this model's have "
                               f"{list(layout.layer_query_heads) or ours[1]}")
        if theirs == ours and list(m.get("kv_heads_per_layer") or []) != list(layout.layer_kv_heads):
            raise ProfileError(f"profile was made for {m.get('spec', 'another model')}, whose layers cache "
                               f"{m.get('kv_heads_per_layer') or theirs[2]} KV heads; this model's cache "
                               f"{list(layout.layer_kv_heads) or ours[2]}")
        if theirs != ours:
            raise ProfileError(f"profile was made for {m.get('spec', 'another model')} ({theirs[0]} layers, "
                               f"{theirs[1]} query heads, {theirs[2]} KV heads); this model has {ours[0]} layers, "
                               f"{ours[1]} query heads, {ours[2]} KV heads")
        theirs_dims = m.get("head_dim_per_layer") or ([m["head_dim"]] * m["num_layers"] if m.get("head_dim") else [])
        ours_dims = [layout.head_size(i) for i in range(layout.num_layers)]
        differ = [i for i, (a, b) in enumerate(zip(theirs_dims, ours_dims, strict=False)) if a != b]
        if differ:
            raise ProfileError(f"profile was made for {m.get('spec', 'another model')}, whose heads in layers "
                               f"{layer_list(differ)} have size {_sizes(theirs_dims, differ)}; this model's have "
                               f"{_sizes(ours_dims, differ)}")
        mine, other = set(self.layers_without_heads), set(getattr(layout, "no_heads", ()))
        if mine != other:
            differ = ", ".join(map(str, sorted(mine ^ other)[:8]))
            raise ProfileError(f"profile was made for {m.get('spec', 'another model')}, whose layers without attention "
                               f"heads are {sorted(mine) or 'none'}; this model's are {sorted(other) or 'none'} "
                               f"(layers {differ} differ)")

    @property
    def layers_without_heads(self) -> list[int]:
        """Layers of the model that have no attention heads (Mamba, linear attention, MLP only): no scores."""
        return list(self.model.get("layers_without_heads") or [])

    def present(self, level: str = "query") -> np.ndarray:
        """[layer, head] bool at `level` ("query" or "kv"): the heads the model has. A layer's heads beyond its own
        count (layers that differ) and layers without heads are cells of the grid, not heads: rankings skip them."""
        m = self.model
        width, counts = ((m["num_query_heads"], m.get("query_heads_per_layer")) if level == "query"
                         else (m["num_kv_heads"], m.get("kv_heads_per_layer")))
        mask = np.arange(width)[None, :] < np.asarray(counts or [width] * m["num_layers"])[:, None]
        mask[self.layers_without_heads] = False
        return mask

    @staticmethod
    def kv_reduce(query: np.ndarray, num_kv_heads: int, per_layer: list[int] | None = None,
                  queries: list[int] | None = None) -> dict[str, Any]:
        """Query-head scores [layer, head] -> KV-head scores, mean and max over each group. With `per_layer` KV
        head counts or `queries` query head counts (layers that differ), each layer groups its own query heads by
        its own count and the KV heads a layer lacks score 0."""
        query = np.asarray(query, dtype=float)
        layers, heads = query.shape
        counts = list(zip(per_layer or [num_kv_heads] * layers, queries or [heads] * layers, strict=True))
        mean, top = np.zeros((layers, num_kv_heads)), np.zeros((layers, num_kv_heads))
        for n, q in set(counts):
            rows = [i for i, c in enumerate(counts) if c == (n, q)]
            grouped = query[rows, :q].reshape(len(rows), n, q // n)
            mean[rows, :n], top[rows, :n] = grouped.mean(-1), grouped.max(-1)
        return {"mean": rounded(mean), "max": rounded(top),
                "note": "KV head k groups query heads [k*g, (k+1)*g), g = query heads / the layer's KV heads"}

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def method(self) -> str:
        return self.data["method"]["name"]

    @property
    def params(self) -> dict[str, Any]:
        """The scoring rules the profile was made with (`scoring.Settings.from_params` reads them back)."""
        return self.data["method"].get("params", {})

    @property
    def probe_set(self) -> dict[str, Any]:
        """The probe set's header: name, version, hash, counts."""
        return self.data["probe_set"]

    @property
    def probes(self) -> list[dict[str, Any]]:
        """One row per probe: its texts, success, whether it counted, and its [layer, head] scores."""
        return self.data["probes"]

    @property
    def environment(self) -> dict[str, Any]:
        return self.data["environment"]

    @property
    def warnings(self) -> list[str]:
        """What the scoring run warned about (few counted probes, families at chance)."""
        return self.data.get("warnings", [])

    @property
    def version(self) -> str:
        """The headprof version (and source revision) that wrote the profile."""
        return self.data["headprof_version"]

    @property
    def source(self) -> dict[str, Any] | None:
        """Where an imported profile came from (file, format, what is unknown); None for a scored one."""
        return self.data.get("source")

    @property
    def has_query_scores(self) -> bool:
        """False for profiles imported at KV level (DuoAttention), which hold KV-head scores only."""
        return self.data["scores"].get("query") is not None

    @property
    def shape(self) -> tuple[int, int]:
        return self.model["num_layers"], self.model["num_query_heads"]

    def query_scores(self) -> np.ndarray:
        """[layer, query head] scores; for profiles imported at KV level, each KV score repeated over its group."""
        q = self.data["scores"].get("query")
        if q is not None:
            return np.asarray(q, dtype=float)
        kv = np.asarray(self.data["scores"]["kv"]["mean"], dtype=float)
        return np.repeat(kv, self.model["num_query_heads"] // self.model["num_kv_heads"], axis=1)

    def kv_scores(self, reduce: str = "mean") -> np.ndarray:
        """[layer, KV head] scores, the query heads of each group reduced by mean or max."""
        if reduce not in ("mean", "max"):
            raise ProfileError(f"unknown group reduction '{reduce}' (use mean or max)")
        return np.asarray(self.data["scores"]["kv"][reduce], dtype=float)

    def per_probe(self, counted_only: bool = True) -> np.ndarray:
        """(probes, layers, heads) per-probe query-head scores."""
        rows = [p["scores"] for p in self.data["probes"] if p.get("counted", True) or not counted_only]
        return np.asarray(rows, dtype=float).reshape(-1, *self.shape)


def build(model: dict[str, Any], method: str, params: dict[str, Any], probe_set: dict[str, Any],
          probes: list[dict[str, Any]], query: np.ndarray | None, environment: dict[str, Any],
          kv: dict[str, Any] | None = None, warnings: list[str] | None = None,
          source: dict[str, Any] | None = None) -> Profile:
    """The one place a profile document is assembled (from a scoring run, or an import), validated.

    `query` [layer, query head] scores give the KV-head scores by group reduction; an import at KV level
    passes `kv` instead."""
    if kv is None:
        if query is None:
            raise ProfileError("a profile needs query-head or KV-head scores")
        kv = Profile.kv_reduce(query, model["num_kv_heads"], model.get("kv_heads_per_layer"),
                               model.get("query_heads_per_layer"))
    data = {
        "schema_version": SCHEMA_VERSION,
        "headprof_version": package_version(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "method": {"name": method, "params": params},
        "probe_set": probe_set,
        "probes": probes,
        "scores": {"query": rounded(query) if query is not None else None, "kv": kv},
        "environment": environment,
        **({"warnings": warnings} if warnings else {}),
        **({"source": source} if source else {}),
    }
    validate(data)
    return Profile(data)


@functools.cache
def package_version() -> str:
    """headprof's installed version, with the checkout's `git describe` when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("headprof")
    except PackageNotFoundError:
        v = "unknown"
    rev = source_revision()
    return f"{v}+{rev}" if rev else v


@functools.cache
def source_revision() -> str | None:
    """`git describe --always --dirty` of the checkout holding this package, or None (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def provenance(device: str, dtype: str, attn_implementation: str | None) -> dict[str, Any]:
    """What a scoring run ran on: library versions, platform, device and numerics."""
    import tokenizers
    import torch
    import transformers

    return {"headprof": package_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "dtype": dtype,
            "attn_implementation": attn_implementation}


PROVENANCE_FIELDS = ("headprof_version", "model.resolved", "model.weights_sha256", "model.revision", "probe_set.name",
                     "probe_set.hash", "environment.torch", "environment.transformers", "environment.tokenizers",
                     "environment.device", "environment.dtype", "environment.attn_implementation")


def provenance_diff(a: Profile, b: Profile) -> list[str]:
    """The provenance fields that differ between two profiles, as 'field: A vs B' (unrecorded fields skipped)."""
    def get(p: Profile, path: str) -> Any:
        node: Any = p.data
        for key in path.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return node

    out = []
    for path in PROVENANCE_FIELDS:
        x, y = get(a, path), get(b, path)
        if x is not None and y is not None and x != y:
            out.append(f"{path}: {x} vs {y}")
    return out


def rounded(a: np.ndarray) -> list:
    """Scores as stored in files (8 decimals), so a reloaded profile equals the written one."""
    return np.round(np.asarray(a, dtype=float), 8).tolist()


def validate(d: Any) -> None:
    """Raise ProfileError naming the first problem."""
    if not isinstance(d, dict):
        raise ProfileError("profile is not a JSON object")
    version = d.get("schema_version")
    if not isinstance(version, int):
        raise ProfileError("profile has no integer schema_version")
    if version > SCHEMA_VERSION:
        raise ProfileError(f"profile schema version {version} is newer than this headprof supports "
                           f"({SCHEMA_VERSION}); upgrade headprof")
    for key in _TOP_KEYS:
        if key not in d:
            raise ProfileError(f"profile is missing '{key}'")
    model = d["model"]
    for key in _MODEL_KEYS:
        if key not in model:
            raise ProfileError(f"profile model is missing '{key}'")
    layers, heads, kv = model["num_layers"], model["num_query_heads"], model["num_kv_heads"]
    per_layer, queries = model.get("kv_heads_per_layer") or [kv], model.get("query_heads_per_layer") or [heads]
    if (not all(isinstance(x, int) and x > 0 for x in (layers, heads, kv, *per_layer, *queries))
            or len(per_layer) not in (1, layers) or len(queries) not in (1, layers)
            or any(q % n for q, n in zip(queries * (layers // len(queries)), per_layer * (layers // len(per_layer)),
                                         strict=True))
            or max(per_layer) != kv or max(queries) != heads):
        raise ProfileError(f"profile model has an impossible head layout ({layers} layers, "
                           f"{model.get('query_heads_per_layer') or heads} query heads, "
                           f"{model.get('kv_heads_per_layer') or kv} KV heads)")
    if not isinstance(d["method"], dict) or not isinstance(d["method"].get("name"), str):
        raise ProfileError("profile method must be an object with a name")
    scores = d["scores"]
    if not isinstance(scores, dict) or "kv" not in scores:
        raise ProfileError("profile scores must hold 'kv' (and 'query' unless imported at KV level)")
    if scores.get("query") is not None:
        _grid(scores["query"], layers, heads, "scores.query")
    for reduce in ("mean", "max"):
        _grid(scores["kv"].get(reduce), layers, kv, f"scores.kv.{reduce}")
    if not isinstance(d["probes"], list):
        raise ProfileError("profile probes must be a list")
    for i, p in enumerate(d["probes"]):
        if not isinstance(p, dict) or "success" not in p or "scores" not in p:
            raise ProfileError(f"probe {i} needs 'success' and 'scores'")
        _grid(p["scores"], layers, heads, f"probes[{i}].scores")


def _grid(g: Any, rows: int, cols: int, where: str) -> None:
    if not isinstance(g, list) or len(g) != rows:
        raise ProfileError(f"{where} must be a list of {rows} layers")
    for r, row in enumerate(g):
        if not isinstance(row, list) or len(row) != cols:
            raise ProfileError(f"{where}[{r}] must hold {cols} heads")
        for v in row:
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise ProfileError(f"{where}[{r}] holds a value that is not a finite number: {v!r}")


def load(path: str | Path) -> Profile:
    return Profile.load(path)


def save(profile: Profile, path: str | Path, force: bool = False) -> Path:
    return profile.save(path, force)


def shipped(model_spec: str, method: str = "r2") -> Path | None:
    """The path of a shipped profile (package data: headprof/profiles/ALIAS/METHOD.json), or None."""
    from importlib.resources import files

    p = Path(str(files("headprof") / "profiles" / model_spec / f"{method}.json"))
    return p if p.is_file() else None


def _sizes(sizes: list[int], layers: list[int]) -> str:
    """The distinct sizes of `layers`, in layer order ("512" or "256, 512")."""
    return ", ".join(map(str, dict.fromkeys(sizes[i] for i in layers)))
