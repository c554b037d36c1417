"""One transaction from MAIL to its end: the policy pipeline, the upstream, delivery."""
