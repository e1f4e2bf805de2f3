"""Decoding probes: greedy (or teacher-forced) decode steps over a batch of probes, each step's attention rows turned
into per-head score increments by the probes' families in one call (`families.step_rows`).

Each probe is prefilled alone and the batch decodes in lockstep over one reserved full cache (`kv.decode_cache`); a
probe stops by its own rule and leaves the batch at once. `score_batch` returns each probe's run: its tokens, answer
and summed scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from headprof.capture import AttentionCapture
from headprof.kv.blocks import token_rows
from headprof.kv.cache import leave
from headprof.kv.decode_cache import PaddedPrefill, alone
from headprof.layout import BLOCK_KINDS
from headprof.models import LoadedModel, end_tokens, last_logits_only, with_cache
from headprof.probing import families as fam
from headprof.probing import probes as probes_mod

MAX_NEW_TOKENS = 50  # the official decode length (Retrieval_Head; HeadKV-R2's cap)


@dataclass
class Decoder:
    """When greedy decoding of a probe's answer stops, and why.

    Default: at an end token, or at a newline once some text exists (the end of the answer line; a
    line ending in ':' announces the answer on the next one), or after `cap` tokens. `official`: the
    scripts' rule, as they write it: after counting the step, at a token of `newlines` (their literal newline
    test, `presets.stop_ids`) or of `stops` (HeadKV-R2's end token; Retrieval_Head has none), and with
    `answer_tokens` (HeadKV-R2) once the output is as long as the answer."""

    tokenizer: Any
    stops: set[int]
    cap: int
    official: bool = False
    answer_tokens: int | None = None
    reason: str = "cap"
    newlines: frozenset[int] = frozenset()  # official: the ids the scripts' newline test matches

    def _line_done(self, generated: list[int]) -> bool:
        """The answer's line has text and does not announce the answer on the next line ("The code is:")."""
        text = self.tokenizer.decode(generated).strip()
        return bool(text) and not text.endswith(":")

    def done(self, token: int, generated: list[int]) -> bool:
        """Records `token` in `generated` (end tokens only under the official rule) and says whether to stop."""
        if token in self.stops and not self.official:
            self.reason = "eos"
            return True
        generated.append(token)
        if token in self.stops:
            self.reason = "eos"
        elif token in self.newlines if self.official else ("\n" in self.tokenizer.decode([token])
                                                           and self._line_done(generated)):
            self.reason = "line"
        elif self.answer_tokens is not None and len(generated) >= self.answer_tokens:
            self.reason = "answer"
        else:
            return len(generated) >= self.cap
        return True


def forced_tokens(tokenizer, answer: str) -> list[int]:
    """The gold answer as the response's first tokens (what `--teacher-forced` feeds)."""
    return list(tokenizer(answer, add_special_tokens=False)["input_ids"])


@dataclass
class ProbeRun:
    response: str
    scores: np.ndarray  # [layer, head], summed over decode steps
    followed: bool  # teacher forcing: greedy decoding would have produced every fed token
    stop: str  # eos, line, answer, cap or forced
    steps: int


@dataclass
class ProbeJob:
    """One rendered probe ready to score: its family, how its decoding stops, and (teacher forcing) the fed tokens."""

    rendered: probes_mod.RenderedProbe
    family: fam.Family
    decoder: Decoder
    forced: list[int] | None = None

    @property
    def steps(self) -> int:
        return len(self.forced) if self.forced is not None else self.decoder.cap


@torch.no_grad()
def score_probe(lm: LoadedModel, rendered: probes_mod.RenderedProbe, family: fam.Family,
                decoder: Decoder | None = None, forced: list[int] | None = None) -> ProbeRun:
    """Scores of one rendered probe: greedy decoding under `decoder`, or with `forced` answer tokens fed
    (teacher forcing) for exactly those steps."""
    decoder = decoder or Decoder(lm.tokenizer, end_tokens(lm), MAX_NEW_TOKENS)
    return score_batch(lm, [ProbeJob(rendered, family, decoder, forced)])[0]


@torch.no_grad()
def score_batch(lm: LoadedModel, jobs: list[ProbeJob],
                on_done: Callable[[int, ProbeRun], None] | None = None) -> list[ProbeRun]:
    """Score several probes together: each prompt prefilled alone, the answers decoded in lockstep.

    Prompts are prefilled one at a time and joined into one cache (decode_cache.py): prefill is compute-
    bound and gains nothing from a batch, while a decode step costs about the same for one sequence as
    for several. Each probe stops by its own rule and leaves the batch (its rows are dropped), and
    `on_done(index, run)` hears of it at once, so a caller can keep finished probes before the batch
    ends. Padding is masked and positions restart at each probe's first token, so every probe scores
    what it scores alone (to float rounding).
    """
    layout = lm.info.layout
    blocks = {i: kind for i, kind in enumerate(layout.attention_kinds) if kind in BLOCK_KINDS}
    if blocks and len(jobs) > 1:  # a block layer's compressor counts windows per sequence: no left padding
        return [score_batch(lm, [job], None if on_done is None else (lambda _, run, i=i: on_done(i, run)))[0]
                for i, job in enumerate(jobs)]
    device = lm.model.device
    runs: list[ProbeRun | None] = [None] * len(jobs)

    def finish(i: int, run: ProbeRun) -> None:
        runs[i] = run
        if on_done is not None:
            on_done(i, run)

    index = []  # positions in `jobs` of the probes that decode (row b of the batch is jobs[index[b]])
    for i, job in enumerate(jobs):
        if job.steps == 0:  # nothing to decode: an empty forced answer
            finish(i, ProbeRun("", np.zeros((layout.num_layers, layout.num_query_heads)), False,
                               "forced" if job.forced is not None else "cap", 0))
        else:
            index.append(i)
    if not index:
        return runs  # type: ignore[return-value]
    live = [jobs[i] for i in index]
    n = len(live)
    lengths = [len(job.rendered.input_ids) for job in live]
    width, most = max(lengths), max(job.steps for job in live)
    pads = [width - length for length in lengths]
    seq = torch.zeros(n, width + most, dtype=torch.long, device=device)  # every token fed so far, left-padded
    for b, job in enumerate(live):
        seq[b, pads[b]:width] = torch.tensor(job.rendered.input_ids, device=device)
    padded = any(pads)
    mask = torch.ones(n, width + most, dtype=torch.long, device=device)
    for b in range(n):
        mask[b, :pads[b]] = 0
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    joined = PaddedPrefill(n, width - 1, most)
    for b in range(n):  # each prompt but its last token alone: full per-layer caches
        if lengths[b] > 1:
            one = alone(lm.model.config)
            lm.model(seq[b:b + 1, pads[b]:width - 1], **with_cache(lm.model, one), **last_logits_only(lm.model),
                     use_cache=True)
            joined.add(b, one, pads[b])
            del one
    cache = joined.cache()  # key index == pad + position, also on sliding layers
    kwargs = {**with_cache(lm.model, cache), **last_logits_only(lm.model), "use_cache": True}

    def forward(ids: torch.Tensor, rows: torch.Tensor, stop: int, pos: torch.Tensor) -> torch.Tensor:
        if not padded:  # no mask and default positions: the plain single-sequence path
            return lm.model(ids, **kwargs).logits
        return lm.model(ids, attention_mask=mask[rows, :stop], position_ids=pos, **kwargs).logits
    ks = [job.family.topk(job.rendered.answer_span[1] - job.rendered.answer_span[0]) for job in live]
    k = max(ks)
    top_vals = torch.zeros(n, layout.num_layers, layout.num_query_heads, k, device=device)
    top_idx = torch.zeros(n, layout.num_layers, layout.num_query_heads, k, dtype=torch.long, device=device)

    def sink(layer: int, probs: torch.Tensor) -> None:
        if layer in blocks:  # rows over the window's keys and compressed entries, read as rows over tokens
            probs = token_rows(probs, cache.layers[layer], blocks[layer])
        kk = min(k, probs.shape[-1])
        v, i = probs[:, :, -1, :].topk(kk, dim=-1)
        h = v.shape[1]  # the layer's own query heads (layers may differ: the grid is the widest layer's)
        top_vals[:len(v), layer, :h, :kk], top_idx[:len(v), layer, :h, :kk] = v, i

    official = any(job.decoder.official for job in live)  # --preset: half-precision steps as the script's
    totals = torch.zeros(n, layout.num_layers, layout.num_query_heads, device=device)
    # per probe, as tensors: each decode step scores the whole batch in a few operations (families.step_rows)
    is_retrieval = torch.tensor([job.family.top1 for job in live], device=device)
    k_of = torch.tensor(ks, device=device)
    spans = (torch.tensor([job.rendered.answer_span for job in live], device=device).view(n, 2)
             + torch.tensor(pads, device=device)[:, None])  # in the batch's columns: each row's padding added
    generated: list[list[int]] = [[] for _ in live]
    predicted: list[list[torch.Tensor]] = [[] for _ in live]
    # teacher-forced tokens as one device tensor (rows that decode freely take their greedy token), so that a step
    # copies nothing from the host: the one host read per step is the greedy tokens the stopping rules need
    forced = torch.zeros(n, most, dtype=torch.long, device=device)
    is_forced = torch.tensor([job.forced is not None for job in live], device=device)
    for b, job in enumerate(live):
        if job.forced is not None:
            forced[b, :len(job.forced)] = torch.tensor(job.forced, device=device)
    active = list(range(n))  # which probes the batch's rows hold, in order
    rows = torch.arange(n, device=device)  # the same, on the device (changed only when a probe ends)
    free = not bool(is_forced.all())
    for step in range(most):
        pos = (positions[rows, -1] + step)[:, None]
        with AttentionCapture(sink, official=official):
            logits = forward(seq[rows, width - 1 + step][:, None], rows, width + step, pos)
        greedy = logits[:, -1].argmax(-1)
        token_t = torch.where(is_forced[rows], forced[rows, step], greedy)
        chosen = greedy.tolist() if free else None
        tokens = [live[b].forced[step] if live[b].forced is not None else chosen[r] for r, b in enumerate(active)]
        m = len(active)
        totals[rows] += fam.step_rows(is_retrieval[rows], top_vals[:m], top_idx[:m], k_of[rows], spans[rows],
                                      seq[rows, :width + step], token_t)
        seq[rows, width + step] = token_t
        ended = []
        for r, b in enumerate(active):
            job, token = live[b], tokens[r]
            if job.forced is not None:
                predicted[b].append(greedy[r])  # no host sync: whether greedy agrees is read once at the end
                if step + 1 == len(job.forced):
                    ended.append(r)
                    scores = totals[b].double().cpu().numpy()
                    followed = bool(torch.equal(torch.stack(predicted[b]).cpu(), torch.tensor(job.forced)))
                    finish(index[b], ProbeRun(lm.tokenizer.decode(job.forced, skip_special_tokens=True).strip(),
                                              scores, followed, "forced", len(job.forced)))
            elif job.decoder.done(token, generated[b]):
                ended.append(r)
                response = lm.tokenizer.decode(generated[b], skip_special_tokens=True).strip()
                finish(index[b], ProbeRun(response, totals[b].double().cpu().numpy(), True, job.decoder.reason,
                                          step + 1))
        if ended:
            active, kept = leave(cache, active, ended, device)
            if kept is None:
                break
            rows = rows[kept]
            free = any(live[b].forced is None for b in active)
    return runs  # type: ignore[return-value]
