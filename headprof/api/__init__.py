"""The Python API: what the CLI calls, for users' own code (a notebook, an eval harness, a generate loop).

Every function takes a model spec (hub id, directory, .gguf file, shipped alias) or a model already
loaded with `load_model`, returns values (dataclasses, `Profile`), raises `HeadprofError` subclasses
with one-line messages, reports long work through a `progress` callback, and never prints.
"""

from headprof.api.artefacts import (
    compare_profiles,
    export_files,
    export_profile,
    heatmap,
    import_profile,
    summarise,
)
from headprof.api.common import (
    check_writable,
    describe_model,
    load_model,
    main_process,
    method_names,
    model_path,
    partial_path,
    read_prompt,
    read_prompts,
    write_output,
)
from headprof.api.evaluation import DEFAULT_EVAL_METHODS, EvalReport, eval_profiles, evaluate
from headprof.api.generation import GenerationReport, generate, generate_many, kept, kept_span
from headprof.api.scoring import (
    CPU_LENGTH,
    CheckResult,
    check,
    default_profile_path,
    preset_probe_set,
    probe_set,
    score,
)
from headprof.artefacts.profile import Profile
from headprof.errors import HeadprofError

__all__ = ["HeadprofError", "Profile", "check", "check_writable", "CheckResult",
    "compare_profiles", "CPU_LENGTH", "DEFAULT_EVAL_METHODS",
    "default_profile_path", "describe_model", "eval_profiles", "EvalReport", "evaluate", "export_files",
    "export_profile",
    "generate", "generate_many", "GenerationReport", "heatmap", "import_profile", "kept", "kept_span", "load_model",
    "main_process", "method_names", "model_path", "partial_path", "preset_probe_set", "probe_set", "read_prompt",
    "read_prompts", "score", "summarise", "write_output"]
