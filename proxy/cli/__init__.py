"""The ``sendguard`` command: one module per command group."""
