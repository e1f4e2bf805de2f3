"""`flash`: flash-attn's `flash_attn_with_kvcache` over the per-head layer's strided views, each head a batch entry
whose keys run from `cache_leftpad` to `cache_seqlens`, the group's query heads sharing its one KV head. CUDA,
fp16/bf16, layers without a sliding window whose heads differ in size and whose values are as wide as their keys
(its semantics read off flash-attn 2.8.4's sources: `cache_seqlens` is an end index, the kernel reads keys from
`cache_leftpad` up to it)."""

from __future__ import annotations

import importlib.util

import torch

from headprof.kv.readers.views import by_bucket

NAME = "flash"
MASKED = False
SINKS = False  # flash-attn's kv-cache kernel takes no sinks: such layers are read by `torch`
DEVICES = None
SLIDING = False


def unavailable(device: str, dtype: torch.dtype) -> str | None:
    """Why flash-attn can run on no layer of a model on `device` in `dtype` (None: it can)."""
    if device != "cuda":
        return f"flash-attn runs on CUDA only, not {device}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn needs float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not installed (pip install \"headprof[gpu]\")"
    return None


def handles(layer) -> bool:
    return not layer.uniform and layer.key_dim == layer.value_dim


def entries_read(layer) -> int:
    """Entries a decode step reads: each window from its segment's start to its last filled slot."""
    return layer.entries()


def read(layer, rows: torch.Tensor, q: int, scaling: float, softcap: float | None) -> torch.Tensor:
    """(1, heads, group * q, dim) rows in window order -> their outputs, one kernel call per bucket (no masks)."""
    return by_bucket(layer, rows, q, scaling, softcap, _bucket, masked=False)


def _bucket(layer, bucket: int, view, rows: torch.Tensor, q: int, scaling: float,
                  softcap: float | None) -> torch.Tensor:
    """flash-attn over one bucket's windows: head i is batch entry i with one KV head; its keys run from the
    window's own start (`cache_leftpad`) to its last filled slot (`cache_seqlens`, an end index)."""
    from flash_attn import flash_attn_with_kvcache

    k, v, _ = view
    _, heads, width, d = k.shape
    first, end = layer.window_bounds(bucket)
    qg = rows.view(heads, -1, q, rows.shape[-1]).transpose(1, 2)  # (heads, q, group, dim)
    out = flash_attn_with_kvcache(qg, k.view(heads, width, 1, d), v.view(heads, width, 1, d),
                                  cache_seqlens=end, cache_leftpad=first, softmax_scale=scaling,
                                  causal=q > 1, softcap=softcap or 0.0)
    return out.transpose(1, 2).reshape(1, heads, -1, out.shape[-1])  # back to (1, heads, group * q, dim)
