"""The readers of the per-head layout: how attention over a compressed per-head layer (`heads.HeadKVLayer`) is
computed, one module per backend, chosen here and nowhere else.

Each KV head reads its own segment of the layer's buffer: the prompt tokens it kept and the tokens generated since,
causal among the new tokens. A reader module has a `NAME`, `unavailable(device, dtype)` (why it can run on no layer
there, or None), `DEVICES` (where it is the default, None: everywhere it runs), `SLIDING` (whether it reads layers
with a sliding window), `SINKS` (whether it computes learned attention sinks), `MASKED` (whether it reads the
layer's mask of what each window may read: a layer read without one holds none), `handles(layer)` (the layers it
reads; the others take `torch`), optionally `refuses(layer)` (why a layer it is forced on cannot be read),
`entries_read(layer)` (what a decode step reads, for the benchmarks) and `read(layer, rows, q, scaling, softcap)`
(and `sinks=` where it computes them). Adding a
backend is one module and one line in `READERS`:

- `triton` (`kernel.py`): one flash-decoding kernel over every segment, reading only what each holds: the default
  on CUDA;
- `torch` (`sdpa.py`): PyTorch's fused SDPA over the layer's strided views, any device and dtype: the default
  elsewhere;
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
from headprof.kv.readers import flash, kernel, sdpa

READERS = {m.NAME: m for m in (kernel, sdpa, flash)}  # the first that can run here is the default
BACKENDS = tuple(sorted(READERS))


def available(device: torch.device | str, dtype: torch.dtype, softcap: float | None = None,
              sliding: bool = False) -> list[str]:
    """Backends that can run here, the default first."""
    kind = torch.device(device).type
    return [name for name, m in READERS.items()
            if (m.SLIDING or not sliding) and (m.DEVICES is None or kind in m.DEVICES)
            and m.unavailable(kind, dtype) is None]


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
    if wanted:
        if wanted not in READERS:
            raise HeadprofError(f"HEADPROF_ATTENTION={wanted}: use one of {', '.join(BACKENDS)}")
        why = unavailable(wanted, device, dtype)
        if why:
            raise HeadprofError(f"HEADPROF_ATTENTION={wanted}: {why}; unset it to use the default backend")
        if READERS[wanted].SLIDING or not sliding:
            return wanted
    return available(device, dtype, softcap, sliding)[0]


def per_row(sinks: torch.Tensor, kv_heads: int, q: int) -> torch.Tensor:
    """A learned sink logit per query head (query heads,) -> per row of a KV head's rows (1, kv_heads, group * q):
    row g * q + t is query head h * group + g's token t, as `attend` lays the rows out."""
    return sinks.reshape(kv_heads, -1, 1).expand(-1, -1, q).reshape(1, kv_heads, -1)


def attend(layer, query: torch.Tensor, scaling: float, softcap: float | None,
           backend: str | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query (batch, query_heads, q, dim) -> output (batch, q, query_heads, dim), as transformers expects.

    The group's query heads and the new tokens are the rows of one (1, segments, group * q, dim) batch, a segment
    per sequence and KV head, so each KV head of each sequence meets its own queries without repeating keys. A
    decode step is a handful of tensor operations whatever the number of heads or sequences (a test counts them).
    `sinks` (query heads,): learned sink logits, for the readers that compute them (`choose` gives such a layer no
    other)."""
    b, hq, q, d = query.shape
    heads = layer.heads
    rows = query.reshape(1, heads, hq * b // heads * q, d)  # sequence s's query head h reads its KV head h // group
    extra = {}
    if sinks is not None:
        extra["sinks"] = per_row(sinks, heads // b, q).repeat(1, b, 1)
    if not layer.in_order:  # window i belongs to KV head win.order[i]
        rows = rows.index_select(1, layer.order)
        if extra:
            extra["sinks"] = extra["sinks"].index_select(1, layer.order)
    out = READERS[backend or layer.backend].read(layer, rows, q, scaling, softcap, **extra)
    if not layer.in_order:
        out = out.index_select(1, layer.unorder)
    if q == 1:
        return out.view(b, 1, hq, -1)
    return out.view(b, hq, q, -1).transpose(1, 2)


def choose(layer, like: torch.Tensor) -> str:
    """The backend that reads a per-head layer being laid out (`heads.HeadKVLayer._lay_out`; `like`: its entries, on
    their device and in their dtype), decided once per layout:
    equal counts are a dense view, and keys and values of different widths a view no kernel takes: `torch`; learned
    sinks go to a backend that computes them (else `torch`);
    otherwise the default or the forced backend, where it handles the layer (else `torch`, as documented above). A
    forced backend that refuses the layer is refused in one line naming why."""
    if layer.uniform or layer.key_dim != layer.value_dim:
        return "torch"
    chosen = pick(like.device, like.dtype, None, layer.sliding_window is not None)
    reader = READERS[chosen]
    if layer.sinks and not reader.SINKS:
        return "torch"
    why = getattr(reader, "refuses", lambda _: None)(layer)
    if why and chosen == os.environ.get("HEADPROF_ATTENTION"):
        raise HeadprofError(f"HEADPROF_ATTENTION={chosen}: {why}; unset it to use the default backend")
    return chosen if reader.handles(layer) else "torch"


def entries_read(layer, backend: str) -> int:
    """Entries one decode step over `layer` reads through `backend` (computed from the layout, on any device)."""
    return READERS[backend].entries_read(layer)


def masked(backend: str) -> bool:
    """Whether a layer read by `backend` must hold the mask of what each window may read."""
    return READERS[backend].MASKED
