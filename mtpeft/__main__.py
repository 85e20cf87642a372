"""``python -m mtpeft ...``: the ``mtpeft`` command (the form Lightning's launcher re-runs for other ranks)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
