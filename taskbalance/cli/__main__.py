"""``python -m taskbalance.cli``: the same as the ``taskbalance`` console script."""

from . import main

main()
