"""The readers of the per-head layout: how attention over a compressed per-head layer (`heads.HeadKVLayer`) is
computed, one module per backend, chosen here and nowhere else.

Each KV head reads its own segment of the layer's buffer: the prompt tokens it kept and the tokens generated since,
causal among the new tokens. A reader module has a `NAME`, `unavailable(device, dtype)` (why it can run on no layer
there, or None), `SLIDING` (whether it reads layers with a sliding window), `handles(layer)` (the layers it reads;
the others take `torch`) and `read(layer, rows, q, scaling, softcap)`. Adding a backend is one module and one line in
`READERS`:

- `torch` (`sdpa.py`): PyTorch's fused SDPA over the layer's strided views, any device and dtype: the default.
- `flash` (`flash.py`): flash-attn's kv-cache kernel over the same views, CUDA, fp16/bf16.

Layers whose heads all keep the same count (SnapKV, StreamingLLM; PyramidKV where a layer's budget divides
evenly among its heads, else its heads differ by one token) are a plain dense view with no mask and always
take `torch`. `HEADPROF_ATTENTION=NAME` forces a backend: refused in one line where it can run on no layer.
"""

from __future__ import annotations

import functools
import os

import torch

from headprof.errors import HeadprofError
from headprof.kv.readers import flash, sdpa

READERS = {m.NAME: m for m in (sdpa, flash)}  # the first that can run is the default
BACKENDS = tuple(sorted(READERS))


def available(device: torch.device | str, dtype: torch.dtype, softcap: float | None = None,
              sliding: bool = False) -> list[str]:
    """Backends that can run here, the default first."""
    kind = torch.device(device).type
    return [name for name, m in READERS.items()
            if (m.SLIDING or not sliding) and m.unavailable(kind, dtype) is None]


def unavailable(backend: str, device: str, dtype: torch.dtype) -> str | None:
    """Why `backend` can run on no layer of a model on `device` in `dtype` (None: it runs on the layers it
    handles; the others take `torch`, as documented above)."""
    return READERS[backend].unavailable(device, dtype)


def pick(device, dtype, softcap: float | None = None, sliding: bool = False) -> str:
    return _pick(torch.device(device).type, dtype, softcap, sliding, os.environ.get("HEADPROF_ATTENTION"))


@functools.cache
def _pick(device: str, dtype: torch.dtype, softcap: float | None, sliding: bool, wanted: str | None) -> str:
    """The default backend, or the one `HEADPROF_ATTENTION` forces: refused in one line where it can run on no
    layer (a benchmark or a run labelled with a backend must have used it), left to `torch` on the layers it
    does not handle."""
    options = available(device, dtype, softcap, sliding)
    if wanted:
        if wanted not in READERS:
            raise HeadprofError(f"HEADPROF_ATTENTION={wanted}: use one of {', '.join(BACKENDS)}")
        why = unavailable(wanted, device, dtype)
        if why:
            raise HeadprofError(f"HEADPROF_ATTENTION={wanted}: {why}; unset it to use the default backend")
        if wanted in options:
            return wanted
    return options[0]


def attend(layer, query: torch.Tensor, scaling: float, softcap: float | None,
           backend: str | None = None) -> torch.Tensor:
    """query (batch, query_heads, q, dim) -> output (batch, q, query_heads, dim), as transformers expects.

    The group's query heads and the new tokens are the rows of one (1, segments, group * q, dim) batch, a segment
    per sequence and KV head, so each KV head of each sequence meets its own queries without repeating keys. A
    decode step is a handful of tensor operations whatever the number of heads or sequences (a test counts them)."""
    b, hq, q, d = query.shape
    heads = layer.heads
    rows = query.reshape(1, heads, hq * b // heads * q, d)  # sequence s's query head h reads its KV head h // group
    if not layer.in_order:  # window i belongs to KV head win.order[i]
        rows = rows.index_select(1, layer.order)
    if backend is None:
        if layer.backend is None:  # decided once per layer (equal counts are a dense view, and keys and values of
            # different widths a view no kernel takes: torch)
            torch_only = layer.uniform or layer.k.shape[-1] != layer.v.shape[-1]
            chosen = "torch" if torch_only else pick(query.device, query.dtype, softcap,
                                                     layer.sliding_window is not None)
            layer.backend = chosen if READERS[chosen].handles(layer) else "torch"
        backend = layer.backend
    out = READERS[backend].read(layer, rows, q, scaling, softcap)
    if not layer.in_order:
        out = out.index_select(1, layer.unorder)
    if q == 1:
        return out.view(b, 1, hq, -1)
    return out.view(b, hq, q, -1).transpose(1, 2)
