"""Compressed generation: one prompt, several prompts in batches, and the positions each head keeps."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from headprof import methods
from headprof.api.common import _free_device_memory, _method, load_model
from headprof.artefacts.profile import Profile
from headprof.compressing import generation
from headprof.compressing.selection import Kept, kept_positions, span_positions
from headprof.defaults import BETA, KERNEL, WINDOW
from headprof.errors import BatchOutOfMemory, HeadprofError, out_of_memory
from headprof.models import LoadedModel
from headprof.probing import answers, probes


@dataclass
class GenerationReport:
    """A compressed generation next to the full-cache one (`runs[1]`, unless `baseline=False`)."""

    model: str
    prompt_tokens: int
    method: str
    budget: int
    window: int
    kernel: int
    beta: float
    group_reduce: str
    compress_sliding: bool
    profile: str | None
    runs: list[generation.RunResult]
    agreement: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("runs", "agreement")}
        d["runs"] = [r.to_dict() for r in self.runs]
        if self.agreement is not None:
            d["agreement"] = self.agreement
        return d


def generate(model: str | LoadedModel, prompt: str | Sequence[int], method: str | methods.Method = "headkv",
             budget: int = 128, *,
             profile: Profile | str | Path | None = None, window: int = WINDOW, kernel: int = KERNEL,
             beta: float = BETA,
             group_reduce: str = "mean", max_new_tokens: int = 64, baseline: bool = True,
             chat_template: bool = True, compress_sliding: bool = True, device: str = "auto",
             dtype: str = "auto", min_new_tokens: int = 0) -> GenerationReport:
    """Generate greedily with `method` at `budget` tokens per KV head, next to the full cache.

    `prompt` is the user message (wrapped in the chat template when the model has one) or token ids; a list of
    prompts (strings or id lists) is decoded in batches by `generate_many`, and a list of reports comes back.
    `method`: a name or spec (`headkv:beta=1.5`; `headkv-r2` uses the alias's shipped r2 profile); `window`,
    `kernel`, `beta`, `group_reduce` apply to the methods that have them unless the spec sets them.
    `profile` (headkv): a Profile, a path, or None for the shipped profile of a model alias. `min_new_tokens`: no
    end token before that many (a measurement of a long generation does not stop early).
    """
    if not isinstance(prompt, str) and prompt and not isinstance(prompt[0], int):
        return generate_many(model, prompt, method, budget, profile=profile, window=window,  # type: ignore[return-value]
                             kernel=kernel, beta=beta, group_reduce=group_reduce, max_new_tokens=max_new_tokens,
                             baseline=baseline, chat_template=chat_template, compress_sliding=compress_sliding,
                             device=device, dtype=dtype, min_new_tokens=min_new_tokens)
    if max_new_tokens < 1:
        raise HeadprofError("--max-new-tokens must be at least 1")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise HeadprofError(f"--min-new-tokens must be between 0 and --max-new-tokens ({max_new_tokens}), "
                            f"got {min_new_tokens}")
    m, where, label = _method(model, method, budget, profile, window, kernel, beta, group_reduce)
    lm = load_model(model, device, dtype)
    if getattr(m, "profile", None) is not None and hasattr(m.profile, "check_fits"):
        m.profile.check_fits(lm.info.layout)
    ids = list(prompt) if not isinstance(prompt, str) else probes.prompt_ids(lm.tokenizer, prompt, chat_template)
    runs = [generation.generate(lm, ids, m, budget, max_new_tokens, min_new_tokens, compress_sliding=compress_sliding)]
    if baseline and m.compresses:
        runs.append(generation.generate(lm, ids, "full", budget, max_new_tokens=max_new_tokens,
                                        min_new_tokens=min_new_tokens))
    return _report(lm, m, label, where, budget, beta, group_reduce, compress_sliding, len(ids), runs)


def kept(model: str | LoadedModel, prompt: str | Sequence[int], method: str | methods.Method = "headkv",
         budget: int = 128, *, profile: Profile | str | Path | None = None, window: int = WINDOW,
         kernel: int = KERNEL, beta: float = BETA, group_reduce: str = "mean", chat_template: bool = True,
         compress_sliding: bool = True, device: str = "auto", dtype: str = "auto") -> Kept:
    """The prompt positions `method` at `budget` keeps, per layer and KV head (what `generate` would hold), with
    `Kept.coverage(span)` for how much of a span (an answer's tokens) each head kept. Options as for `generate`."""
    m, _, _ = _method(model, method, budget, profile, window, kernel, beta, group_reduce)
    lm = load_model(model, device, dtype)
    if getattr(m, "profile", None) is not None and hasattr(m.profile, "check_fits"):
        m.profile.check_fits(lm.info.layout)
    ids = list(prompt) if not isinstance(prompt, str) else probes.prompt_ids(lm.tokenizer, prompt, chat_template)
    return kept_positions(lm, ids, m, budget, compress_sliding)


def kept_span(model: str | LoadedModel, prompt: str | Sequence[int], text: str, method: str | methods.Method = "headkv",
              budget: int = 128, **options: Any) -> dict[str, Any]:
    """How much of `text` (a span of the prompt, an answer) each KV head keeps: its positions, the [layer][kv_head]
    share kept (None for a layer that keeps every token), and how many compressed heads keep all of it. Options as
    for `kept`."""
    lm = load_model(model, options.pop("device", "auto"), options.pop("dtype", "auto"))
    k = kept(lm, prompt, method, budget, **options)
    positions = span_positions(lm.tokenizer, k.prompt_ids, text)
    cov = k.coverage(positions)
    rows = [None if layer is None else [round(float(c), 4) for c in cov[i, :len(layer)]]
            for i, layer in enumerate(k.positions)]
    heads = [c for row in rows if row is not None for c in row]
    return {"text": text, "method": k.method, "budget": budget, "positions": positions, "coverage": rows,
            "heads": len(heads), "whole": sum(c == 1.0 for c in heads)}


def _report(lm: LoadedModel, m: methods.Method, label: str, where: str | None, budget: int, beta: float,
            group_reduce: str, compress_sliding: bool, prompt_tokens: int,
            runs: list[generation.RunResult]) -> GenerationReport:
    runs[0].method = label
    agreement = None
    if len(runs) > 1:
        agreement = {"exact": runs[0].text == runs[1].text,
                     "token_f1": answers.agreement(runs[0].text, runs[1].text)}
    return GenerationReport(model=lm.info.resolved, prompt_tokens=prompt_tokens, method=label, budget=budget,
                            window=m.window, kernel=m.kernel, beta=getattr(m, "beta", beta),
                            group_reduce=getattr(m, "reduction", group_reduce),
                            compress_sliding=compress_sliding, profile=where, runs=runs, agreement=agreement)


def generate_many(model: str | LoadedModel, prompts: Sequence[str | Sequence[int]],
                  method: str | methods.Method = "headkv", budget: int = 128, *, batch_size: int = 8,
                  names: Sequence[str] | None = None, notice: Callable[[str], None] | None = None,
                  **options) -> list[GenerationReport]:
    """`generate` for several prompts, `batch_size` at a time: each batch one compressed cache (a segment per
    sequence and KV head) and one attention call per layer, each prompt the tokens it gets alone. A batch that
    runs out of memory is halved and retried (`notice` hears of it; finished batches are kept). Options as for
    `generate`. Every prompt is checked (empty, longer than the model's positions: named by `names`) before any
    work starts."""
    if batch_size < 1:
        raise HeadprofError(f"--batch-size must be at least 1, got {batch_size}")
    if not prompts:
        raise HeadprofError("no prompt given")
    names = list(names) if names is not None else [f"prompt {i + 1}" for i in range(len(prompts))]
    options = {"profile": None, "window": WINDOW, "kernel": KERNEL, "beta": BETA, "group_reduce": "mean",
               "max_new_tokens": 64, "baseline": True, "compress_sliding": True, "min_new_tokens": 0, **options}
    max_new, min_new = options["max_new_tokens"], options["min_new_tokens"]
    if max_new < 1:
        raise HeadprofError("--max-new-tokens must be at least 1")
    if not 0 <= min_new <= max_new:
        raise HeadprofError(f"--min-new-tokens must be between 0 and --max-new-tokens ({max_new}), got {min_new}")
    m, where, label = _method(model, method, budget, options["profile"], options["window"], options["kernel"],
                              options["beta"], options["group_reduce"])
    lm = load_model(model, options.pop("device", "auto"), options.pop("dtype", "auto"))
    if getattr(m, "profile", None) is not None and hasattr(m.profile, "check_fits"):
        m.profile.check_fits(lm.info.layout)
    chat = options.pop("chat_template", True)
    ids = []
    for name, p in zip(names, prompts, strict=True):
        if isinstance(p, str) and not p.strip():
            raise HeadprofError(f"{name} is empty")
        one = list(p) if not isinstance(p, str) else probes.prompt_ids(lm.tokenizer, p, chat)
        if lm.info.max_positions and len(one) + max_new > lm.info.max_positions:
            raise HeadprofError(f"{name}: {len(one)} tokens + {max_new} new tokens exceed the model's "
                                f"{lm.info.max_positions} positions")
        ids.append(one)
    size = batch_size
    if lm.info.layout.latent and m.compresses and size > 1:  # one selection per MLA layer: one prompt at a time
        size = 1
        if notice is not None:
            notice("MLA latents are compressed one prompt at a time: --batch-size 1")
    compressed = _in_batches(lm, ids, m, budget, (min_new, max_new), options["compress_sliding"], size, notice)
    full = (_in_batches(lm, ids, methods.build("full"), budget, (min_new, max_new), True, size, notice)
            if options["baseline"] and m.compresses else [None] * len(ids))
    return [_report(lm, m, label, where, budget, options["beta"], options["group_reduce"], options["compress_sliding"],
                    len(prompt), [c] + ([f] if f is not None else []))
            for c, f, prompt in zip(compressed, full, ids, strict=True)]


def _in_batches(lm: LoadedModel, ids: list[list[int]], m: methods.Method, budget: int, new: tuple[int, int],
                compress_sliding: bool, size: int, notice: Callable[[str], None] | None) -> list:
    """Every prompt's run, `size` at a time; a batch that runs out of memory is halved and retried with the prompts
    it had not finished (those that finished are kept)."""
    runs: list = [None] * len(ids)
    todo = list(range(len(ids)))
    while todo:
        chunk = todo[:size]
        try:
            made = dict(enumerate(generation.generate_batch(lm, [ids[i] for i in chunk], m, budget, new[1],
                                                            compress_sliding=compress_sliding,
                                                            min_new_tokens=new[0])))
        except Exception as e:
            if not (isinstance(e, BatchOutOfMemory) or out_of_memory(e)):
                raise
            if size == 1:
                raise HeadprofError(f"out of memory on one prompt of {len(ids[chunk[0]])} tokens: use a shorter "
                                    "prompt, --dtype bfloat16 or a smaller --max-new-tokens") from None
            made, size = getattr(e, "finished", {}), max(1, len(chunk) // 2)
            if notice is not None:
                notice(f"out of memory on {len(chunk)} prompts at once ({len(made)} had finished and are kept): "
                       f"batches of {size} from now on")
            _free_device_memory()
        for j, run in made.items():
            runs[chunk[j]] = run
        todo = [i for i in todo if runs[i] is None]
    return runs
