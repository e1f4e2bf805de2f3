"""StreamingLLM (Xiao et al. 2023): attention sinks (the first tokens) and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headprof.methods.base import Method, register

SINK = 4


def streaming_positions(prefix: int, keep: int, sink: int = SINK) -> torch.Tensor:
    """The first `sink` tokens and the most recent ones before the window."""
    keep = min(keep, prefix)
    first = min(sink, keep)
    return torch.cat([torch.arange(first), torch.arange(prefix - (keep - first), prefix)]).long()


@register
@dataclass
class Streaming(Method):
    name = "streaming"
    rank = 10
    summary = f"the first {SINK} tokens (sink) and the most recent b - {SINK}"
    hard = {"sink": 0, "window": 4}

    sink: int = SINK  # attention-sink tokens kept at the start

    def choose(self, plan, layer, probs):
        lo = plan.first_candidate(layer)
        return [streaming_positions(plan.prefix - lo, int(b), self.sink).to(probs.device) + lo
                for b in plan.budgets[layer]]
