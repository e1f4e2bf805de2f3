"""Compression methods, one module each, behind one interface (`base.Method`) and one registry."""

from headprof.methods import adakv, full, headkv, pyramidkv, snapkv, split, streaming  # noqa: F401  (registration)
from headprof.methods.base import REGISTRY, Method, build, get, names, register
from headprof.methods.spec import Spec, parse_spec, resolve

__all__ = ["REGISTRY", "Method", "Spec", "build", "get", "names", "register", "parse_spec", "resolve"]
