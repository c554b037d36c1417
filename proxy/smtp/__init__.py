"""The inbound SMTP session: commands, AUTH, limits, timeouts and replies."""
