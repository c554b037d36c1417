"""sendguard: an outbound SMTP filtering proxy that enforces consent, unsubscribe and privacy rules."""

__version__ = "0.1.0"
