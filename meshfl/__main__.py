"""``python -m meshfl ...``: the same as the ``meshfl`` command."""

from .cli import main

main(prog_name="meshfl")
