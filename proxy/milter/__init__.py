"""Milter mode: the policy pipeline behind an MTA's milter interface (Postfix's smtpd_milters)."""
