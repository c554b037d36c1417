"""What an operator sees: metrics, logs and the audit trail, the HTTP endpoints."""
