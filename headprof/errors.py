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


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` says the device ran out of memory (torch.OutOfMemoryError, or a RuntimeError saying so)."""
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


class BatchOutOfMemory(Exception):
    """A batch ran out of memory after some of its sequences had finished: `finished` keeps their results (by
    index in the batch), so a smaller batch retries only the others."""

    def __init__(self, finished: dict, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.finished = finished


class NothingAnswered(HeadprofError):
    """An official protocol's run in which no probe succeeded: the scripts write no scores, so neither does
    headprof unless asked to (exit 1: the run worked, the model did not)."""

    exit_code = 1
