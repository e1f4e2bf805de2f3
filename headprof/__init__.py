"""headprof: find the attention heads that matter, write them down as a profile, compress the KV cache.

The Python API (the `headprof` command is a thin layer over it; see docs/api.md):

    import headprof
    prof = headprof.score("smollm2-135m", "retrieval", lengths=[1000], depths=3, min_answered=None)  # -> Profile
    prof.save("retrieval.json")
    report = headprof.generate("smollm2-135m", "...long text... Question?", "headkv", budget=64, profile=prof)
    with headprof.compression(model, "headkv", budget=128, profile=prof) as cache:  # any HF causal LM
        model.generate(ids, cache=cache, max_new_tokens=64)

Names are imported on first use, so `import headprof` (and the CLI's start) stays cheap.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("headprof")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "unknown"

_EXPORTS = {
    "score": "headprof.api", "generate": "headprof.api", "generate_many": "headprof.api",
    "evaluate": "headprof.api", "check": "headprof.api",
    "kept": "headprof.api", "kept_span": "headprof.api", "Kept": "headprof.compressing.selection",
    "load_model": "headprof.api", "GenerationReport": "headprof.api", "EvalReport": "headprof.api",
    "CheckResult": "headprof.api", "compression": "headprof.compressing.generation",
    "RunResult": "headprof.compressing.generation", "Profile": "headprof.artefacts.profile",
    "Method": "headprof.methods", "register": "headprof.methods",
    "HeadprofError": "headprof.errors",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'headprof' has no attribute '{name}'")
