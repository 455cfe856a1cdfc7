"""``python -m drsft``: the ``drsft`` command without its console script (drsft.cli)."""

from drsft.cli import main

main(prog_name="drsft")
