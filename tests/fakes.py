"""A LoadedModel around a tiny random model, with a tokenizer that needs no files."""

from __future__ import annotations

from tiny import model

from headprof import capture
from headprof.models import LoadedModel, ModelInfo, layout_of


class WordTokenizer:
    """Token i <-> word 'w{i}'; enough for scoring, which only decodes generated tokens."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return " ".join(f"w{i}" for i in ids)


def loaded(arch: str, seed: int = 0, **overrides) -> LoadedModel:
    m = model(arch, seed, **overrides)
    m.generation_config.eos_token_id = None
    impl = capture.attach(m)
    info = ModelInfo(spec=f"tiny-{arch}", resolved=f"tiny-{arch}", revision=None, weights_sha256=None,
                     architecture=type(m).__name__, model_type=m.config.model_type,
                     layout=layout_of(m.config), max_positions=512, chat_template=False)
    return LoadedModel(model=m, tokenizer=WordTokenizer(), info=info, device="cpu", dtype="float32",
                       attn_implementation=impl)
