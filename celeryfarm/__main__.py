"""``python -m celeryfarm``: the ``celeryfarm`` command, for when its script is not on PATH."""

from .cli import main

main()
