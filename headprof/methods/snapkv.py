"""SnapKV (Li et al. 2024): the same budget for every head, the positions the window attends to most."""

from dataclasses import dataclass

from headprof.methods.base import Method, register


@register
@dataclass
class SnapKV(Method):
    name = "snapkv"
    rank = 20
    summary = "b tokens for every head, chosen by the observation window's pooled attention"
    hard = {"window": 4, "kernel": 1}
