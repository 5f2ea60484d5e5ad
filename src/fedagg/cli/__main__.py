"""``python -m fedagg.cli``: the ``fedagg`` command."""

from fedagg.cli import main

raise SystemExit(main())
