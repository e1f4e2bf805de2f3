"""Compression methods, one module each, behind one interface (`base.Method`) and one registry."""

from headprof.methods import adakv, full, headkv, pyramidkv, snapkv, streaming  # noqa: F401  (registration)
from headprof.methods.base import REGISTRY, Method, get, names, register

__all__ = ["REGISTRY", "Method", "get", "names", "register", "parse_spec"]


def parse_spec(spec: str) -> tuple[Method, str | None]:
    """'snapkv' -> (SnapKV, None); 'headkv-r2' -> (HeadKV, 'r2'): a profile-driven method and its profile."""
    base, _, profile = spec.partition("-")
    if base in REGISTRY and REGISTRY[base].needs_profile and profile:
        return get(base), profile
    return get(spec), None
