"""Compression methods, one module each, behind one interface (`base.Method`) and one registry."""

from headprof.compression.methods import adakv, full, headkv, pyramidkv, snapkv, streaming  # noqa: F401  (registration)
from headprof.compression.methods.base import REGISTRY, Method, build, get, names, register
from headprof.compression.methods.spec import Spec, parse_spec, resolve

__all__ = ["REGISTRY", "Method", "Spec", "build", "get", "names", "register", "parse_spec", "resolve"]
