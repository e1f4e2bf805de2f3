"""The `headprof` command: parse arguments, call the Python API (`headprof.api`), print. One module per
command group; no logic of its own."""

# the order of these imports is the order of the commands in --help
from headprof.cli import profiling, compression, artefacts  # noqa: F401, I001  (they register their commands)
from headprof.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
