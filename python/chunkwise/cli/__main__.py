"""``python -m chunkwise.cli``: the same as the ``chunkwise`` command."""

from . import main

raise SystemExit(main())
