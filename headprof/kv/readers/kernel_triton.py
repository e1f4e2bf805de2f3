"""The Triton source of the `triton` reader (`kernel.py`): a flash-decoding pass over the per-head layout.

Imported only when the kernel runs (it needs Triton; on CPU under `TRITON_INTERPRET=1`, set before this module is
imported). Program (segment, split) reads keys and values straight from the layer's buffer, entries
start + [split * ITERS * BLOCK_N, ...) of its segment and never past the segment's length, for all the query rows
of its segment (the GQA group's heads times the new tokens), and writes its split's running max, sum and weighted
values; `kernel.read` combines the splits. Loop bounds are compile-time (`ITERS`), as Triton 3.6's interpreter needs.
`UPCAST` multiplies half-precision inputs in fp32 (TF32 on the GPU, exact for them; the interpreter's own bf16 dot
product is wrong in Triton 3.9, off by orders of magnitude, so this is also what lets the interpreter check bf16).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_split(Q, KV, START, KEPT, POS, ACC, M, L,
                 generated, q_len, rows, qpos0, window, scale, softcap,
                 stride_q_seg, stride_q_row, stride_kv, v_col,
                 stride_a_split, stride_a_seg, stride_a_row, stride_m_split, stride_m_seg,
                 D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, ITERS: tl.constexpr,
                 HAS_POS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    seg = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(START + seg)  # int64: where the segment starts in the buffer (64-bit offsets throughout)
    n = tl.load(KEPT + seg).to(tl.int64) + generated  # entries the segment holds: kept, then generated
    r = tl.arange(0, ROWS)
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    live = r < rows
    tok = r % q_len  # row r is query head r // q_len of the group at new token r % q_len
    last = n - q_len + tok  # causal among the new tokens: row r reads entries j <= last[r]
    q = tl.load(Q + seg * stride_q_seg + r[:, None] * stride_q_row + d[None, :],
                mask=live[:, None] & (d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full((ROWS,), float("-inf"), tl.float32)
    l_i = tl.zeros((ROWS,), tl.float32)
    acc = tl.zeros((ROWS, DV_PAD), tl.float32)
    lo = split * (ITERS * BLOCK_N)
    if lo < n:
        for it in range(ITERS):
            j = lo + it * BLOCK_N + tl.arange(0, BLOCK_N)
            valid = j < n
            at = (start + j) * stride_kv
            k = tl.load(KV + at[:, None] + d[None, :], mask=valid[:, None] & (d[None, :] < D), other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            if HAS_SOFTCAP:
                x = s / softcap
                s = softcap * (2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0)  # tanh
            allowed = valid[None, :] & (j[None, :] <= last[:, None])
            if HAS_POS:  # a sliding window, by position: keys older than the window are hidden
                kpos = tl.load(POS + start + j, mask=valid, other=0)
                allowed = allowed & (kpos[None, :] > (qpos0 + tok)[:, None] - window)
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            v = tl.load(KV + at[:, None] + v_col + dv[None, :], mask=valid[:, None] & (dv[None, :] < DV), other=0.0)
            if UPCAST:
                v = v.to(tl.float32)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
    tl.store(ACC + split * stride_a_split + seg * stride_a_seg + r[:, None] * stride_a_row + dv[None, :], acc)
    tl.store(M + split * stride_m_split + seg * stride_m_seg + r, m_i)
    tl.store(L + split * stride_m_split + seg * stride_m_seg + r, l_i)
