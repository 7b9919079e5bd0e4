"""The `stillroom` command: a thin layer over the Python API, one module per pipeline stage.

Imports of stillroom's stages (and through them torch) happen inside each command, so `--help`
is instant and works without the training extras.
"""

from __future__ import annotations

import os
import sys

from stillroom.cli.common import app, console

# Importing a stage module registers its commands; the order here is the order `--help` lists them.
from stillroom.cli import data  # noqa: E402,F401  isort:skip
from stillroom.cli import train  # noqa: E402,F401  isort:skip
from stillroom.cli import evaluate  # noqa: E402,F401  isort:skip
from stillroom.cli import serve  # noqa: E402,F401  isort:skip
from stillroom.cli import report  # noqa: E402,F401  isort:skip
from stillroom.cli import run  # noqa: E402,F401  isort:skip
from stillroom.cli import curate  # noqa: E402,F401  isort:skip
from stillroom.cli import label  # noqa: E402,F401  isort:skip
from stillroom.cli import export  # noqa: E402,F401  isort:skip
from stillroom.cli import interop  # noqa: E402,F401  isort:skip

__all__ = ["app", "main"]


def quiet_libraries() -> None:
    """No downloads at run time and no library progress bars over ours."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    """Entry point: known problems become one clear message and exit code 2, never a traceback."""
    from stillroom.errors import USER_ERRORS

    quiet_libraries()
    try:
        app()
    except USER_ERRORS as exc:
        from rich.text import Text

        console(stderr=True).print(Text("error: ", style="red") + Text(str(exc)))
        sys.exit(2)
    except KeyboardInterrupt:
        console(stderr=True).print("interrupted; everything finished so far is kept in the store.")
        sys.exit(130)
    except Exception as exc:  # an unexpected bug: still a sentence, with the way to get details
        if os.environ.get("STILLROOM_DEBUG"):
            raise
        from rich.text import Text

        console(stderr=True).print(Text("unexpected error: ", style="red") + Text(
            f"{type(exc).__name__}: {exc}\nSet STILLROOM_DEBUG=1 for the full traceback."))
        sys.exit(3)


if __name__ == "__main__":
    main()
