"""Models built in code for benchmarks and GPU checks (no download): a Llama-3-shaped model with random
weights and a character tokenizer, saved as an ordinary Hugging Face directory that `headprof` loads
like any local model."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def llama3_shaped(layers: int = 32, max_positions: int = 16384, head_dim: int = 16) -> LlamaConfig:
    """Llama-3-8B's head layout (32 layers, 32 query heads, 8 KV heads) at hidden size 512, head_dim 16 (or the real
    model's 128: an attention stack whose caches are Llama-3-8B's, per layer, at a small hidden size)."""
    return LlamaConfig(vocab_size=128, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=head_dim,
                       max_position_embeddings=max_positions,
                       rope_theta=500000.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def llama3_8b_layers(layers: int = 8, max_positions: int = 40000) -> LlamaConfig:
    """Llama-3-8B's own layer size (hidden 4096, 32 query heads, 8 KV heads, head_dim 128, MLP 14336),
    fewer layers: attention and cache per layer cost what they cost in the real model."""
    return LlamaConfig(vocab_size=128, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=max_positions, rope_theta=500000.0, bos_token_id=None,
                       eos_token_id=None, pad_token_id=None)


def loaded_in_memory(config: LlamaConfig, device: str, dtype: torch.dtype):
    """A LoadedModel built directly on `device` (no files: a multi-GB random model need not be saved)."""
    from headprof import capture
    from headprof.models import LoadedModel, ModelInfo, layout_of

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    info = ModelInfo(spec="llama3-8b-layers", resolved=f"Llama-3-8B-sized layers x{config.num_hidden_layers}",
                     revision=None, weights_sha256=None, architecture="LlamaForCausalLM", model_type="llama",
                     layout=layout_of(config), max_positions=config.max_position_embeddings, chat_template=False)
    impl = capture.attach(model)
    return LoadedModel(model=model, tokenizer=char_tokenizer(), info=info, device=device,
                       dtype=str(dtype).removeprefix("torch."), attn_implementation=impl)


def char_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["\n"] = 95
    vocab["[UNK]"] = 96
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = CHAT
    return fast


def save(path: str | Path, layers: int = 32, seed: int = 0, max_positions: int = 16384, head_dim: int = 16) -> Path:
    """Write the model and tokenizer to `path` (a directory) and return it."""
    path = Path(path)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama3_shaped(layers, max_positions, head_dim), dtype=torch.float32)
    model.generation_config.eos_token_id = None
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
