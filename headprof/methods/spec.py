"""Method specs as users write them: `snapkv`, `adakv:safeguard=0.1`, `headkv:profile=r2,beta=1.5`.

`headkv-r2` is short for `headkv:profile=r2` (the eval grids and docs have always used it). The spec
string is the method's label in results; its options override the grid-wide `--window`, `--beta`, ...
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from headprof.errors import MethodError
from headprof.methods.base import REGISTRY, Method, build, names, pooled_window

SCORERS = {"pooled": pooled_window}  # token scorers a spec may name (scorer=pooled)


@dataclass(frozen=True)
class Spec:
    """A parsed method spec: the registered name, its options, and the profile it names (if any)."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)
    profile: str | None = None

    @property
    def method_class(self) -> type[Method]:
        return REGISTRY[self.name]

    def build(self, profiles: dict[str, Any] | None = None, profile: Any = None, **defaults: Any) -> Method:
        """The method with the spec's options, `defaults` (window, beta, ...) for options it has and the spec
        leaves unset, and its profile: `profile` itself, or the one the spec names, looked up in `profiles`."""
        accepted = self.method_class.options()
        options = {k: v for k, v in defaults.items() if k in accepted and v is not None} | self.options
        if profile is None and self.profile is not None:
            if not profiles or self.profile not in profiles:
                raise MethodError(f"method {self.label} needs the profile '{self.profile}', which is not loaded")
            profile = profiles[self.profile]
        if profile is not None and "profile" in accepted:
            options["profile"] = profile
        return build(self.name, **options)


def parse_spec(text: str) -> Spec:
    """`NAME`, `NAME:KEY=VALUE,...` or `NAME-PROFILE` -> Spec; one-line MethodError for anything else."""
    label = text.strip()
    name, colon, rest = label.partition(":")
    options: dict[str, Any] = {}
    profile = None
    if not colon and name not in REGISTRY:
        base, _, short = name.partition("-")
        if base in REGISTRY and REGISTRY[base].needs_profile and short:
            name, profile = base, short
    if name not in REGISTRY:
        raise MethodError(f"unknown method '{label}' (use {', '.join(names())}; options as NAME:KEY=VALUE, "
                          "e.g. headkv:profile=r2,beta=1.5)")
    accepted = REGISTRY[name].options()
    for part in [p.strip() for p in rest.split(",") if p.strip()] if colon else []:
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or not value.strip():
            raise MethodError(f"method option '{part}' in {label} is not KEY=VALUE")
        if key not in accepted:
            raise MethodError(f"{name} has no option '{key}' (its options: {', '.join(accepted)})")
        if key == "profile":
            profile = value.strip()
            continue
        default = accepted[key]
        if default is None:  # an option unset by default: its annotation says what it takes ("float | None")
            kind = {f.name: str(f.type) for f in dataclasses.fields(REGISTRY[name])}.get(key, "")
            default = 0.0 if "float" in kind else 0 if "int" in kind else None
        options[key] = _value(label, key, value.strip(), default)
    return Spec(label, name, options, profile)


def _value(label: str, key: str, text: str, default: Any) -> Any:
    if key == "scorer":
        if text not in SCORERS:
            raise MethodError(f"unknown scorer '{text}' in {label} (use {', '.join(SCORERS)})")
        return SCORERS[text]
    kind = type(default) if default is not None else str
    try:
        return kind(text) if kind is not int else int(text)
    except ValueError:
        raise MethodError(f"{key}={text} in {label}: expected {'an integer' if kind is int else 'a number'}") from None


def resolve(method: str | Method, profile: Any = None, **defaults: Any) -> Method:
    """A Method from an instance (as is) or a spec string, with `profile` and `defaults` (window, kernel,
    beta, reduction, ...) for the options the method has and the spec leaves unset."""
    if isinstance(method, Method):
        return method
    return parse_spec(method).build(profile=profile, **defaults)
