"""Write a headprof model as a Hugging Face folder that transformers 4.37 (the official HeadKV scripts' environment)
reads: its weights as loaded (a GGUF alias dequantized), the config in 4.37's terms (`rope_theta`, not
`rope_parameters`) and a slow BPE tokenizer (`vocab.json`, `merges.txt`; the scripts ask for `use_fast=False`).
The folder headprof itself scores is `OUT/hf`; the one for the scripts is `OUT/hf437` (the same weights file).

    python benchmarks/hf_folder.py smollm2-135m OUT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from headprof import api


def main(spec: str, out: str) -> None:
    root = Path(out)
    hf, old = root / "hf", root / "hf437"
    lm = api.load_model(spec, device="cpu")
    lm.model.save_pretrained(hf, safe_serialization=True)
    lm.tokenizer.save_pretrained(hf)
    old.mkdir(parents=True, exist_ok=True)
    config = json.loads((hf / "config.json").read_text())
    rope = config.pop("rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        sys.exit(f"{spec}: rope scaling {rope['rope_type']} is not written for transformers 4.37 here")
    config.update(rope_theta=rope.get("rope_theta", 10000.0), rope_scaling=None,
                  torch_dtype=config.pop("dtype", "float32"), transformers_version="4.37.2")
    (old / "config.json").write_text(json.dumps(config, indent=1))
    tok = json.loads((hf / "tokenizer.json").read_text())
    if tok["model"]["type"] != "BPE":
        sys.exit(f"{spec}: a {tok['model']['type']} tokenizer; only byte-level BPE is written as a slow tokenizer")
    (old / "vocab.json").write_text(json.dumps(tok["model"]["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]]
    (old / "merges.txt").write_text("\n".join(merges) + "\n")
    special = json.loads((hf / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False,
        **{k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in special},
        "additional_special_tokens": [a["content"] for a in tok["added_tokens"] if a["special"]]}, indent=1))
    link = old / "model.safetensors"
    if not link.exists():
        link.symlink_to(Path("..") / "hf" / "model.safetensors")
    print(f"wrote {hf} (headprof) and {old} (transformers 4.37)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/hf_folder.py MODEL OUT")
    main(sys.argv[1], sys.argv[2])
