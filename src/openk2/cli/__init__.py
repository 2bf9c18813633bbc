"""The `openk2` command line. Each module below registers its commands on `app`."""

from openk2.cli import (
    eval,  # noqa: F401
    experiment,  # noqa: F401
    hf,  # noqa: F401
    model,  # noqa: F401  (registers commands)
    plan,  # noqa: F401
    rephrase,  # noqa: F401
    rl,  # noqa: F401
    serve,  # noqa: F401
    sft,  # noqa: F401
    synth,  # noqa: F401
    train,  # noqa: F401
)
from openk2.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
