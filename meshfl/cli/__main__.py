"""``python -m meshfl.cli``: the same as the ``meshfl`` command."""

from . import main

main(prog_name="meshfl")
