"""Loading models and profiles, resolving methods, and the small file and prompt helpers the CLI shares."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from headprof import distributed, methods, models
from headprof import partial as partial_mod
from headprof.artefacts.profile import Profile, shipped
from headprof.errors import HeadprofError, ProfileError
from headprof.files import check_output, write_atomic
from headprof.models import LoadedModel


def load_model(spec: str | LoadedModel, device: str = "auto", dtype: str = "auto",
               device_map: str | None = None) -> LoadedModel:
    """Load a causal LM (or pass a loaded one through), attached to headprof's attention function."""
    if isinstance(spec, LoadedModel):
        return spec
    return models.load(spec, device=device, dtype=dtype, device_map=device_map)


def _load_on_every_process(world: distributed.World, model: str | LoadedModel, device: str, dtype: str = "auto",
                           device_map: str | None = None) -> LoadedModel:
    """Load on this process; if any process fails, every process raises its error, none waits for the others."""
    lm, failure = None, None
    try:
        lm = load_model(model, world.device(device), dtype, device_map)
    except HeadprofError as e:
        failure = e
    world.agree(failure)
    assert lm is not None
    return lm


def _profile(profile: Profile | str | Path | None, model: str, name: str = "r2",
             named: bool = False, method: str = "headkv") -> tuple[Profile, str]:
    """The profile a profile-driven method uses: given, or the one headprof ships for the model alias as `name`
    (`named`: the method spec asked for that name, e.g. headkv-retrieval)."""
    if isinstance(profile, Profile):
        return profile, "(in memory)"
    path = Path(profile) if profile is not None else shipped(model, name)
    if path is None:
        if named:
            raise ProfileError(f"no shipped profile '{name}' for {model} (the method names it): pass --profile, or "
                               "use a shipped one (r2, retrieval) or a model alias that has one")
        raise ProfileError(f"{method} needs a profile for {model}: pass --profile (make one with headprof score)")
    return Profile.load(path), str(path)


def _method(model: str | LoadedModel, method: str | methods.Method, budget: int, profile, window: int, kernel: int,
            beta: float, group_reduce: str) -> tuple[methods.Method, str | None, str]:
    """The built method (with its profile: given, or the alias's shipped one), where the profile came from, and the
    method's label in reports."""
    model_spec = model if isinstance(model, str) else model.info.spec
    built = isinstance(method, methods.Method)
    spec = None if built else methods.parse_spec(method)
    needs = (type(method).needs_profile and getattr(method, "profile", None) is None) if built \
        else spec.method_class.needs_profile
    named = spec is not None and spec.profile is not None
    prof, where = _profile(profile, model_spec, spec.profile if named else "r2", named,
                           type(method).name if built else spec.name) if needs else (None, None)
    if built:
        m = dataclasses.replace(method, profile=prof) if prof is not None else method
    else:
        m = spec.build(profile=prof, window=window, kernel=kernel, beta=beta, reduction=group_reduce)
    if m.compresses and budget <= m.window:
        raise HeadprofError(f"--budget {budget} must exceed --window {m.window}")
    return m, where, m.name if built else method


def _free_device_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_output(path: str | Path, text: str, force: bool = False) -> Path:
    """Write `text` atomically; an existing file is only replaced with `force`."""
    return write_atomic(Path(path), text, force)


def check_writable(path: str | Path, force: bool = False) -> None:
    """Refuse, before any work, an output that exists (without `force`) or cannot be written."""
    check_output(Path(path), force)


def describe_model(model: str) -> models.ModelInfo:
    """A model's head layout, kinds, positions and provenance, from its config (no weights loaded)."""
    return models.describe(model)


def model_path(model: str) -> str:
    """Where a model's Hugging Face files are (a GGUF model: its dequantised copy), for other tools."""
    return models.local_path(model)


def method_names() -> tuple[str, ...]:
    return methods.names()


def read_prompt(path: str | Path) -> str:
    from headprof.files import read_prompt as read

    return read(Path(path))


def read_prompts(paths: Sequence[str | Path]) -> list[tuple[str, str]]:
    """(name, text) of the prompts in text files and JSONL files (one prompt per line), all checked first."""
    from headprof.files import read_prompts as read

    return read([Path(p) for p in paths])


def partial_path(out: str | Path) -> Path:
    """Where a scoring run keeps its finished probes (this process's file under torchrun / accelerate)."""
    return partial_mod.path_for(Path(out), distributed.world())


def main_process() -> bool:
    """False in every process but the first under torchrun / accelerate launch (which alone prints)."""
    return distributed.world().main
