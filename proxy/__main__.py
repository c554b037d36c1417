"""``python -m proxy`` is the ``sendguard`` command."""

from proxy.cli import main

raise SystemExit(main())
