"""The ``neurothermo`` console script: the CLI, or a message naming the extra it needs."""
from __future__ import annotations

import sys


def main() -> None:
    try:
        from neurothermo.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if exc.name in {"typer", "rich", "matplotlib", "sklearn", "click"}:
            sys.stderr.write(
                f"error: the neurothermo command line needs the 'experiments' extra ({exc.name} is "
                "not installed): pip install 'neurothermo[experiments]'\n")
            raise SystemExit(2) from None
        raise
    cli_main()
