"""Tiny random causal LMs of several architectures, built from configs in code (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GptOssConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              max_position_embeddings=512)


def config(arch: str, **overrides):
    c = _config(arch)
    for k, v in overrides.items():
        setattr(c, k, v)
    return c


def _config(arch: str):
    if arch == "llama":  # GQA: 4 query heads share 2 KV heads
        return LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2)
    if arch == "llama-mha":  # multi-head attention: one query head per KV head
        return LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=4)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=1)
    if arch == "mistral":
        return MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    if arch == "gemma3":  # sliding-window layers with a window much shorter than the prompts
        return Gemma3TextConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                sliding_window=8, layer_types=["sliding_attention", "full_attention",
                                                               "sliding_attention"])
    if arch == "gemma2":  # logit soft-capping
        return Gemma2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=None)
    if arch == "gpt_oss":  # a learned attention sink per head (`s_aux`), sliding and full layers
        return GptOssConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                            num_local_experts=2, num_experts_per_tok=1,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    raise ValueError(arch)


ARCHS = ["llama", "qwen2", "mistral", "gemma3", "gemma2"]


def model(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    m = AutoModelForCausalLM.from_config(config(arch, **overrides), dtype=torch.float32)
    # sharpen attention so that top-k choices are not decided by float noise
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            if hasattr(layer.self_attn, "sinks"):  # sinks that take a real share of each row
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, layer.self_attn.sinks.numel()))
    return m.eval()


def char_tokenizer(fuse: bool = False):
    """A character-level fast tokenizer (ids 0..95) with offsets, built in code; `fuse`: decoding gives the
    text back exactly (the official prompt building decodes and encodes again)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {chr(i): i - 32 for i in range(32, 127)}
    vocab["[UNK]"] = 95
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if fuse:
        tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def save(arch: str, path, seed: int = 0):
    """A tiny model directory that `headprof` loads like any local model."""
    m = model(arch, seed)
    m.generation_config.eos_token_id = None
    m.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path
