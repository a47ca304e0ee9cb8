"""``python -m streammerge``: the same as the ``streammerge`` command."""

from ._entry import main

main()
