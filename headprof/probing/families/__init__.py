"""Probe families, one module each; this registry maps names to them and says which a method mixes.

Adding a family is one module that defines a `Family` subclass and `FAMILY = ...`, listed here.
Probe-set versions change by rule: whenever what a generated probe carries changes (texts, spans,
fields), the method's version goes up and the old versions stay buildable, so an old profile's probe
set rebuilds exactly (tests check their hashes).
"""

from __future__ import annotations

from collections.abc import Sequence

from headprof.errors import ProbeError
from headprof.probing.families import comparison, disambiguation, paper, paper_v1, retrieval, two_hop
from headprof.probing.families.base import SPANS, Family, Needle, UserNeedles, span_text, step_rows

__all__ = ["FAMILIES", "PROTOCOLS", "R2_FAMILIES", "SPANS", "Family", "Needle", "UserNeedles", "span_text", "step_rows",
           "get", "parse", "VERSIONS", "for_version", "carries_fact", "mixes", "needs_distractors"]

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (retrieval, disambiguation, comparison, paper,
                                                                  two_hop, paper_v1)}
PROTOCOLS = ("retrieval", "r2")
R2_FAMILIES = ("disambiguation", "comparison", "paper", "two-hop")

# method -> versions, newest (the default) first
VERSIONS = {"retrieval": ("2", "1"), "r2": ("3", "2", "1")}
_FAMILIES_OF = {("retrieval", "2"): ("retrieval",), ("retrieval", "1"): ("retrieval",),
                ("r2", "3"): R2_FAMILIES, ("r2", "2"): R2_FAMILIES, ("r2", "1"): ("paper-v1",)}
_WITHOUT_FACT = {("retrieval", "1"), ("r2", "2"), ("r2", "1")}  # made before probes carried their fact


def get(name: str) -> Family:
    if name not in FAMILIES:
        raise ProbeError(f"unknown probe family '{name}' (use {', '.join(FAMILIES)})")
    return FAMILIES[name]


def for_version(protocol: str, version: str) -> tuple[str, ...]:
    """The families a method's probe-set version draws from."""
    if protocol not in PROTOCOLS:
        raise ProbeError(f"unknown scoring method '{protocol}' (use {' or '.join(PROTOCOLS)})")
    if version not in VERSIONS[protocol]:
        raise ProbeError(f"unknown {protocol} probe-set version '{version}' (use {', '.join(VERSIONS[protocol])})")
    return _FAMILIES_OF[(protocol, version)]


def mixes(protocol: str, version: str) -> bool:
    """Whether each cell draws its family from the mix (so a chosen subset is allowed)."""
    return len(for_version(protocol, version)) > 1


def needs_distractors(protocol: str) -> bool:
    """Whether a user's needles for this method must name wrong facts (the reasoning families do)."""
    return all(FAMILIES[f].candidates > 1 for f in for_version(protocol, VERSIONS[protocol][0]))


def carries_fact(protocol: str, version: str) -> bool:
    return (protocol, version) not in _WITHOUT_FACT


def parse(text: str | Sequence[str] | None, protocol: str, version: str) -> tuple[str, ...]:
    """The families to mix (default: all of the version's), validated."""
    allowed = for_version(protocol, version)
    if text is None:
        return allowed
    if not mixes(protocol, version):
        raise ProbeError("--families chooses among r2 (version 2 and later) probes only")
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ProbeError(f"unknown r2 family '{unknown[0] if unknown else text}' (use {', '.join(allowed)})")
    return tuple(dict.fromkeys(names))
