"""A port of the official scoring loops, kept as independent evidence for the fast implementation.

It shares no rule code with `scoring.py`, `families/`, `answers.py` or `presets.py`: it builds the
official prompt, finds the correct-fact span by token overlap, decodes with eager attention and
`output_attentions=True` (full attention matrices for every layer), scores with Python loops over
layers, heads and top-k positions, and counts a probe by its own copy of the official F1 / ROUGE rules
(HeadKV `Important_Head/retrieval_head_detection_r2.py` and `retrieval_head_detection.py`;
nightdessert/Retrieval_Head). Only the model's own forward pass is shared. Tests check that
`headprof score --preset ...` gives the same scores, responses and verdicts to 1e-5, and that the
default scoring path gives the same scores as `naive_scores`; `benchmarks/bench_score.py` times both.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from headprof.capture import implementation
from headprof.models import with_cache


@dataclass
class OfficialResult:
    response: str
    scores: np.ndarray  # [layer, query head], summed over decode steps
    success: bool
    metric: float
    span: tuple[int, int]
    prompt_ids: list[int]


def _normalize(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _qa_f1(prediction: str, truth: str) -> float:
    p, t = _normalize(prediction).split(), _normalize(truth).split()
    same = sum((Counter(p) & Counter(t)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(t)
    return 2 * precision * recall / (precision + recall)


def _rouge1_recall(reference: str, prediction: str) -> float:
    ref = re.sub(r"[^a-z0-9]+", " ", reference.lower()).split()
    pred = re.sub(r"[^a-z0-9]+", " ", prediction.lower()).split()
    if not ref:
        return 0.0
    return sum((Counter(ref) & Counter(pred)).values()) / len(ref)


def official_context(tok, haystack: str, needle: str, length: int, depth_percent: float) -> str:
    """generate_context + insert_needle of the scripts: trim, leave 200 tokens, insert at a period."""
    context = ""
    while len(context.split()) < length:
        context += haystack
    ids = tok.encode(context)
    if len(ids) > length:
        context = tok.decode(ids[:length])
    tokens_needle = tok.encode(needle)
    tokens_context = tok.encode(context)
    length -= 200
    if len(tokens_context) + len(tokens_needle) > length:
        tokens_context = tokens_context[:length - len(tokens_needle)]
    if depth_percent == 100:
        return tok.decode(tokens_context + tokens_needle)
    insertion_point = int(len(tokens_context) * (depth_percent / 100))
    tokens_new_context = tokens_context[:insertion_point]
    period_tokens = tok.encode(".")  # the scripts' branch for a tokenizer they do not list
    while tokens_new_context and tokens_new_context[-1] not in period_tokens:
        insertion_point -= 1
        tokens_new_context = tokens_context[:insertion_point]
    tokens_new_context += tokens_needle + tokens_context[insertion_point:]
    return tok.decode(tokens_new_context)


def find_needle_idx(prompt_ids: list[int], needle_ids: list[int], r2: bool) -> tuple[int, int]:
    """R2: the last window with the largest token-set overlap; retrieval: the first with overlap > 0.9."""
    span_len = len(needle_ids)
    max_overlap = 0.0
    start = end = 0
    for i in range(len(prompt_ids)):
        span_ids = set(prompt_ids[i:i + span_len])
        overlap = len(span_ids.intersection(set(needle_ids))) / len(set(needle_ids))
        if not r2 and overlap > 0.9:
            return i, i + span_len
        if r2 and overlap >= max_overlap:
            max_overlap, start, end = overlap, i, i + span_len
    return (start, end) if r2 else (-1, -1)


@torch.no_grad()
def official_probe(lm, haystack: str, needle: str, question: str, real_needle: str, answer: str | None,
                   length: int, depth: float, r2: bool) -> OfficialResult:
    """One probe of `--preset headkv` (r2) or `--preset retrieval-head`, the scripts' way."""
    tok = lm.tokenizer
    context = official_context(tok, haystack, needle, length, round(depth * 100))
    prompt = context + f"Based on the content of the book, Question: {question}\nAnswer:"
    prompt_ids = list(tok(prompt)["input_ids"])
    start, end = find_needle_idx(prompt_ids, tok(real_needle, add_special_tokens=False)["input_ids"], r2)
    layout = lm.info.layout
    result = np.zeros((layout.num_layers, layout.num_query_heads))
    answer_len = len(tok(answer, add_special_tokens=False)["input_ids"]) if r2 and answer else None
    eos = lm.model.config.eos_token_id  # R2 compares the id with the config's value, whatever its type
    output: list[int] = []
    cache = DynamicCache()
    ids = torch.tensor([prompt_ids], device=lm.model.device)
    prefill = "sdpa" if getattr(lm.model, "_supports_sdpa", False) else "eager"  # Gemma 2 soft-caps: eager
    with implementation(lm.model, prefill):  # the scripts prefill with flash attention: SDPA's semantics
        lm.model(ids[:, :-1], **with_cache(lm.model, cache), use_cache=True)
    inp = ids[:, -1:]
    with implementation(lm.model, "eager"):  # and decode with their `forward_torch`, what eager computes
        for _ in range(50):
            out = lm.model(inp, **with_cache(lm.model, cache), use_cache=True, output_attentions=True)
            token = int(out.logits[0, -1].argmax())
            output.append(token)
            for layer in range(layout.num_layers):
                for head in range(layout.query_heads(layer)):
                    row = out.attentions[layer][0, head, -1].float()
                    values, idx = row.topk(end - start if r2 else 1)
                    for v, i in zip(values.tolist(), idx.tolist(), strict=True):
                        if r2 and start <= i < end:
                            result[layer, head] += v / (end - start)
                        if not r2 and start <= i < end and token == prompt_ids[i]:
                            result[layer, head] += 1 / (end - start)
                            break
            newline = tok.convert_ids_to_tokens(token) == "<0x0A>" or token == 144  # as the scripts test it
            if newline or (r2 and (token == eos or len(output) >= (answer_len or 0))):
                break
            inp = torch.tensor([[token]], device=lm.model.device)
    response = tok.decode(output, skip_special_tokens=True).strip()
    metric = _qa_f1(response, answer or "") if r2 else _rouge1_recall(real_needle, response)
    return OfficialResult(response, result, metric > 0.5, metric, (start, end), prompt_ids)


@torch.no_grad()
def naive_scores(lm, input_ids: list[int], span: tuple[int, int], r2: bool, max_steps: int,
                 forced: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(generated tokens, [layer, head] scores) of headprof's default decode, computed the naive way: eager
    attention, loops over heads; decoding stops at an end token or at a newline once text exists. With
    `forced`, the gold tokens are fed and the generated tokens are the greedy predictions."""
    tok = lm.tokenizer
    start, end = span
    layout = lm.info.layout
    result = np.zeros((layout.num_layers, layout.num_query_heads))
    tokens = list(input_ids)
    eos = {tok.eos_token_id, *(lambda e: e if isinstance(e, list) else [e])(
        getattr(lm.model.generation_config, "eos_token_id", None))} - {None}
    generated: list[int] = []
    with implementation(lm.model, "eager"):
        cache = DynamicCache()
        ids = torch.tensor([input_ids], device=lm.model.device)
        lm.model(ids[:, :-1], **with_cache(lm.model, cache), use_cache=True)
        step_input = ids[:, -1:]
        for step in range(len(forced) if forced is not None else max_steps):
            out = lm.model(step_input, **with_cache(lm.model, cache), use_cache=True, output_attentions=True)
            token = int(out.logits[0, -1].argmax())
            if forced is not None:
                generated.append(token)
                token = forced[step]
            for layer in range(layout.num_layers):
                for head in range(layout.query_heads(layer)):
                    row = out.attentions[layer][0, head, -1].float()
                    values, idx = row.topk(end - start if r2 else 1)
                    for v, i in zip(values.tolist(), idx.tolist(), strict=True):
                        if start <= i < end and (r2 or tokens[i] == token):
                            result[layer, head] += (v if r2 else 1.0) / (end - start)
            if forced is None:
                if token in eos:
                    break
                generated.append(token)
                if "\n" in tok.decode([token]) and tok.decode(generated).strip():
                    break
            tokens.append(token)
            step_input = torch.tensor([[token]], device=lm.model.device)
    return generated, result


def per_head_attention(layer, query: torch.Tensor, scaling: float, softcap: float | None,
                       sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention over a compressed layer one KV head at a time (what `attention.attend` batches).

    query (1, query_heads, q, dim) -> (1, q, query_heads, dim). The q new tokens are the last q tail
    entries; they attend causally among themselves, and on a sliding-window layer only to keys whose
    position is inside the window. `sinks` (query_heads,): learned logits that join each head's softmax.
    """
    _, heads, q, _ = query.shape
    kv_heads = len(layer.lens)
    group = heads // kv_heads
    out = query.new_empty(1, q, heads, layer.v.shape[-1])
    qpos = torch.arange(layer.seen - q, layer.seen, device=query.device)
    for h in range(kv_heads):
        k, v, pos = layer.head_kv(h)
        n = k.shape[0]
        logits = torch.matmul(query[0, h * group:(h + 1) * group].float(), k.float().T) * scaling
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        allowed = torch.arange(n, device=k.device)[None, :] <= torch.arange(n - q, n, device=k.device)[:, None]
        if layer.sliding_window is not None:
            allowed &= pos[None, :] > qpos[:, None] - layer.sliding_window
        logits = logits.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if sinks is not None:
            sink = sinks[h * group:(h + 1) * group].float()[:, None, None].expand(-1, q, 1)
            probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        o = torch.matmul(probs, v.float()).to(query.dtype)
        out[0, :, h * group:(h + 1) * group] = o.transpose(0, 1)
    return out
