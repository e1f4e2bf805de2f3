"""`triton`: one flash-decoding kernel over every segment of a per-head layer, the default on CUDA.

Each program reads one segment's kept and generated entries straight from the layer's buffer, by the segment's
start and length (device tensors made when the layer is laid out, plus the generated count the host already
knows): no strided views, no mask, no padding read. The GQA group's query rows and the new tokens share a program
(causal among the new tokens); soft-capping and sliding windows (by position) are applied in the kernel; fp32 (IEEE
products), fp16 and bf16 (read as stored, multiplied in fp32: TF32 on the GPU holds a half-precision input exactly,
and the softmax weights keep 10 bits where a bf16 cast keeps 7); 64-bit offsets. Long segments are split
(`_splits`) so that a batch of one still fills the GPU; a small combine of the splits' partial results follows, and
learned sinks (gpt-oss) join the softmax there (a sink is one more logit in each row's sum, reading no value). A
decode step is one launch and the combine, with no host synchronisation.

On CPU it runs only where asked for by name under Triton's interpreter (`TRITON_INTERPRET=1`, which the tests
use to check it against the per-head reference); the CPU default stays `torch`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os

import torch

NAME = "triton"
SLIDING = True
MASKED = False  # reads each segment's bounds itself: a layer read by it holds no mask
SINKS = True  # computes learned sinks (in the combine)
DEVICES = ("cuda",)  # where it is the default
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD = 256  # head sizes it takes (query rows and a key block are held in registers)
BLOCK_N = 64


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def unavailable(device: str, dtype: torch.dtype) -> str | None:
    """Why the kernel can run on no layer on `device` in `dtype` (None: it can)."""
    interpreted = _interpreted()
    if device != "cuda" and not (device == "cpu" and interpreted):
        return f"the Triton kernel runs on CUDA only, not {device} (on CPU only under TRITON_INTERPRET=1)"
    if dtype not in DTYPES:
        return f"the Triton kernel takes float32, float16 or bfloat16, not {str(dtype).removeprefix('torch.')}"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (CUDA builds of PyTorch ship it; pip install triton)"
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is visible here"
    return None


def refuses(layer) -> str | None:
    """Why the kernel cannot read this layer (None: it can)."""
    widest = max(layer.key_dim, layer.value_dim)
    if widest > MAX_HEAD:
        return f"the Triton kernel takes head sizes up to {MAX_HEAD}, not {widest}"
    return None


def handles(layer) -> bool:
    return not layer.uniform and refuses(layer) is None


@functools.cache
def _kernel():
    from headprof.kv.readers.kernel_triton import decode_split

    return decode_split


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _splits(longest: int, segments: int, device: torch.device) -> tuple[int, int]:
    """(splits, iterations per split): enough programs to fill the device when segments are few, each split a
    power-of-two number of key blocks so the kernel compiles once per doubling of the longest segment."""
    blocks = max(1, math.ceil(longest / BLOCK_N))
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
        splits = min(max(1, math.ceil(target / segments)), max(1, blocks // 4))
    else:
        splits = 1
    iters = _pow2(math.ceil(blocks / splits), floor=1)
    return math.ceil(blocks / iters), iters


def entries_read(layer) -> int:
    """Entries a decode step reads: each segment's kept and generated entries, nothing else."""
    return layer.entries()


def read(layer, rows: torch.Tensor, q: int, scaling: float, softcap: float | None,
         sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(1, heads, group * q, dim) rows in window order -> their outputs, one launch for the whole layer; `sinks`
    (1, heads, group * q): the rows' learned sink logits."""
    _, heads, n_rows, d = rows.shape
    dv = layer.v.shape[-1]
    rows = rows.contiguous()
    longest = int(layer.seg.kept_w.max()) + layer.generated  # host values: no synchronisation
    splits, iters = _splits(longest, heads, rows.device)
    pad = _pow2(n_rows)
    acc = torch.empty((splits, heads, pad, _pow2(dv)), dtype=torch.float32, device=rows.device)
    m = torch.empty((splits, heads, pad), dtype=torch.float32, device=rows.device)
    s = torch.empty_like(m)
    pos = layer.positions if layer.positions is not None else layer.starts
    _kernel()[(heads, splits)](
        rows, layer.kv, layer.starts, layer.kept_dev, pos, acc, m, s,
        layer.generated, q, n_rows, layer.seen - q, layer.sliding_window or 0, scaling, softcap or 1.0,
        rows.stride(1), rows.stride(2), layer.kv.stride(0), layer.key_dim,
        acc.stride(0), acc.stride(1), acc.stride(2), m.stride(0), m.stride(1),
        D=d, DV=dv, D_PAD=_pow2(d), DV_PAD=_pow2(dv), ROWS=pad, BLOCK_N=BLOCK_N, ITERS=iters,
        HAS_POS=layer.positions is not None, HAS_SOFTCAP=softcap is not None,
        IEEE=rows.dtype == torch.float32 or _interpreted(), UPCAST=rows.dtype != torch.float32)
    acc, m, s = acc[:, :, :n_rows, :dv], m[:, :, :n_rows], s[:, :, :n_rows]
    if splits == 1 and sinks is None:
        return (acc[0] / s[0, ..., None]).to(rows.dtype)[None]
    top = m.amax(0)
    if sinks is not None:  # the sink's logit joins each row's maximum and sum, with no value
        top = torch.maximum(top, sinks[0].float())
    weight = torch.exp(m - top)
    total = (s * weight).sum(0)
    if sinks is not None:
        total = total + torch.exp(sinks[0].float() - top)
    return ((acc * weight[..., None]).sum(0) / total[..., None]).to(rows.dtype)[None]
