"""The Triton decode kernel (`kv/readers/kernel.py`) equals the per-head reference on the layouts headprof makes,
and a whole generation through it gives the torch path's tokens. On CPU it runs under Triton's interpreter
(conftest sets TRITON_INTERPRET=1 before the kernel's module is imported)."""

import importlib.util

import numpy as np
import pytest
import torch
from fakes import loaded

from headprof import methods
from headprof.compressing import generation
from headprof.errors import HeadprofError
from headprof.kv import readers
from headprof.kv.heads import HeadKVLayer
from headprof.probing import reference

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(lens, dim=16, dtype=torch.float32, sliding=None, seed=0, prompt=None):
    """A per-head layer holding `lens` kept prompt tokens per KV head (random keys, batch 1)."""
    g = torch.Generator().manual_seed(seed)
    prompt = prompt or max(lens) + 7
    layer = HeadKVLayer(sliding_window=sliding)
    keys = torch.randn(1, len(lens), prompt, dim, generator=g).to(DEVICE, dtype)
    layer.keys, layer.values = keys, torch.randn(keys.shape, generator=g).to(DEVICE, dtype)
    layer.seen = prompt
    layer.compress([torch.randperm(prompt, generator=g)[:n].sort().values.to(DEVICE) for n in lens])
    return layer


def _step(layer, group, q, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    heads, dim = layer.heads, layer.key_dim
    new = torch.randn(1, heads, q, dim, generator=g).to(DEVICE, dtype)
    layer.update(new, torch.randn(new.shape, generator=g).to(DEVICE, dtype))
    return torch.randn(1, heads * group, q, dim, generator=g).to(DEVICE, dtype)


LAYOUTS = {  # name: (kept tokens per KV head, query heads per KV head, head size, sliding window, softcap)
    "gqa": ([40, 3, 17, 64], 4, 16, None, None),
    "very different sizes and a segment of one entry": ([1, 300, 2, 90, 1, 33, 7, 150], 2, 32, None, None),
    "sliding window": ([20, 5, 30, 12], 2, 16, 24, None),
    "softcap": ([9, 50, 4, 26], 4, 16, None, 30.0),
    "no GQA, head size 64": ([12, 70, 33], 1, 64, None, None),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_kernel_equals_the_per_head_reference_in_fp32(name):
    lens, group, dim, sliding, softcap = LAYOUTS[name]
    layer = _layer(lens, dim, sliding=sliding)
    assert layer.backend in ("torch", "triton") and not layer.uniform
    for step, q in enumerate((1, 3, 1, 1, 2, 1)):  # several new tokens in a step: causal among them
        query = _step(layer, group, q, step, torch.float32)
        out = readers.attend(layer, query, dim ** -0.5, softcap, "triton")
        ref = reference.per_head_attention(layer, query, dim ** -0.5, softcap)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < 1e-5, (name, step)


@pytest.mark.parametrize("name", ["gqa", "very different sizes and a segment of one entry", "sliding window"])
def test_the_kernel_is_within_one_bf16_rounding_step_of_the_reference(name):
    lens, group, dim, sliding, softcap = LAYOUTS[name]
    layer = _layer(lens, dim, torch.bfloat16, sliding=sliding)
    for step, q in enumerate((1, 2, 1)):
        query = _step(layer, group, q, step, torch.bfloat16)
        out = readers.attend(layer, query, dim ** -0.5, softcap, "triton").float()
        ref = reference.per_head_attention(layer, query, dim ** -0.5, softcap).float()  # fp32 math, bf16 result
        step_size = torch.finfo(torch.bfloat16).eps * ref.abs().clamp(min=1e-3)  # one bf16 step at that magnitude
        assert ((out - ref).abs() <= step_size + 1e-6).float().mean() > 0.99
        assert (out - ref).abs().max() <= 2 * step_size.max()


@pytest.mark.parametrize("splits", [1, 3])
def test_learned_sinks_join_the_softmax_in_the_combine(splits, monkeypatch):
    """gpt-oss's sink logit per query head, one program per segment or split across several."""
    from headprof.kv.readers import kernel

    monkeypatch.setattr(kernel, "_splits", lambda longest, segments, device: (splits, 8 // splits or 1))
    layer = _layer([300, 20, 250, 5], 16)
    sinks = torch.linspace(-2.0, 4.0, 8).to(DEVICE)  # 8 query heads: 4 KV heads of 2
    for step, q in enumerate((1, 2)):
        query = _step(layer, 2, q, step, torch.float32)
        out = readers.attend(layer, query, 0.25, None, "triton", sinks=sinks)
        ref = reference.per_head_attention(layer, query, 0.25, None, sinks)
        assert (out - ref).abs().max() < 1e-5
        assert (out - reference.per_head_attention(layer, query, 0.25, None)).abs().max() > 1e-2  # they matter


def test_long_segments_split_across_programs_and_combine_exactly(monkeypatch):
    """Segments longer than a split are read by several programs whose partial sums are combined."""
    from headprof.kv.readers import kernel

    monkeypatch.setattr(kernel, "_splits", lambda longest, segments, device: (3, 2))  # 3 splits of 2 blocks
    layer = _layer([300, 20, 250, 5], 16)
    query = _step(layer, 4, 1, 0, torch.float32)
    out = readers.attend(layer, query, 0.25, None, "triton")
    assert (out - reference.per_head_attention(layer, query, 0.25, None)).abs().max() < 1e-5


def test_a_layer_read_by_bounds_holds_no_mask_and_the_torch_path_still_reads_it():
    layer = _layer([40, 3, 17, 64])
    layer.backend = "triton"
    layer._place(layer.kv, layer.positions, layer._segments(), layer.room, layer.win)  # laid out again, by bounds
    assert layer._open is None and layer.nbytes() == layer.kv.numel() * layer.kv.element_size()
    query = _step(layer, 2, 1, 0, torch.float32)
    torch_out = readers.attend(layer, query, 0.25, None, "torch")  # builds the mask it needs on the fly
    assert (torch_out - reference.per_head_attention(layer, query, 0.25, None)).abs().max() < 1e-5


@pytest.mark.skipif(DEVICE == "cuda", reason="the tiny models run on CPU: checked there under the interpreter")
@pytest.mark.parametrize("arch", ["llama", "gemma2", "mistral", "gpt_oss"])
def test_a_whole_generation_through_the_kernel_gives_the_torch_paths_tokens(arch, monkeypatch):
    lm = loaded(arch)
    scores = np.linspace(1.0, 0.02, lm.info.layout.num_layers * lm.info.layout.num_kv_heads) ** 2  # heads differ
    method = methods.resolve("headkv", scores.reshape(lm.info.layout.num_layers, -1), window=8)
    prompt = torch.randint(0, 96, (60,), generator=torch.Generator().manual_seed(1)).tolist()
    readers._pick.cache_clear()
    monkeypatch.setenv("HEADPROF_ATTENTION", "torch")
    plain = generation.generate(lm, prompt, method, 20, max_new_tokens=12)
    readers._pick.cache_clear()
    monkeypatch.setenv("HEADPROF_ATTENTION", "triton")
    kernel = generation.generate(lm, prompt, method, 20, max_new_tokens=12)
    readers._pick.cache_clear()
    assert kernel.tokens == plain.tokens and len(kernel.tokens) == 12
    assert kernel.kv_entries == plain.kv_entries  # the same tokens held; no mask, so the slack is free room
    assert kernel.kv_bytes <= 1.05 * plain.kv_bytes


def test_asking_for_the_kernel_where_it_cannot_run_is_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    readers._pick.cache_clear()
    monkeypatch.setenv("HEADPROF_ATTENTION", "triton")
    with pytest.raises(HeadprofError, match=r"^HEADPROF_ATTENTION=triton: the Triton kernel takes float32, float16 or "
                                            r"bfloat16, not float64; unset"):
        readers.pick("cpu", torch.float64)
    monkeypatch.delenv("TRITON_INTERPRET")
    readers._pick.cache_clear()
    with pytest.raises(HeadprofError, match="runs on CUDA only, not cpu"):
        readers.pick("cpu", torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    readers._pick.cache_clear()
    with pytest.raises(HeadprofError, match="head sizes up to 256, not 512"):
        _layer([3, 9], 512)
    readers._pick.cache_clear()
    assert "triton" not in readers.available("cpu", torch.float32)  # on CPU the default stays torch


@pytest.mark.skipif(DEVICE == "cuda", reason="the tiny models run on CPU: checked there under the interpreter")
def test_a_batch_through_the_kernel_gives_each_prompt_the_torch_paths_tokens(monkeypatch):
    """The segments of several sequences of different lengths (each its own budgets) read in one launch."""
    lm = loaded("llama")
    lay = lm.info.layout
    scores = np.linspace(1.0, 0.05, lay.num_layers * lay.num_kv_heads).reshape(lay.num_layers, -1) ** 2
    method = methods.resolve("headkv", scores, window=8)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (50, 71, 64)]
    runs = {}
    for backend in ("torch", "triton"):
        readers._pick.cache_clear()
        monkeypatch.setenv("HEADPROF_ATTENTION", backend)
        runs[backend] = generation.generate_batch(lm, prompts, method, 24, max_new_tokens=10)
    readers._pick.cache_clear()
    assert [r.tokens for r in runs["triton"]] == [r.tokens for r in runs["torch"]]
