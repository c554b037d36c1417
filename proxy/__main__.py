"""``python -m proxy`` is the ``sendguard`` command."""

from proxy.cli.main import main

raise SystemExit(main())
