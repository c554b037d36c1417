"""What keeps the sending domains' reputation: DKIM, DNS checks, backoff, bounces."""
