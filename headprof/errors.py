"""Typed errors. The library raises these; the CLI turns them into one-line messages and exit codes."""


class HeadprofError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ModelError(HeadprofError):
    """The model spec cannot be resolved or the model is not a usable causal LM."""


class ProbeError(HeadprofError):
    """Probe parameters or user probe files are invalid."""


class ProfileError(HeadprofError):
    """A profile file is missing, corrupt, of an unknown version or does not fit the model."""


class OutputError(HeadprofError):
    """An output path cannot be written, or would overwrite something without --force."""


class MethodError(HeadprofError):
    """An unknown compression method, or an option it does not have."""


class NothingAnswered(HeadprofError):
    """An official protocol's run in which no probe succeeded: the scripts write no scores, so neither does
    headprof unless asked to (exit 1: the run worked, the model did not)."""

    exit_code = 1
