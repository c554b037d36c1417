"""``sendguard report``: the compliance report for a period and the evidence pack for one
address, from the audit log (streamed) and the consent store.

auditlog.py reads the log and tells each recipient's fate; compliance.py builds the report;
evidence.py builds the pack for one address; render.py writes JSON, CSV and HTML (Jinja2,
autoescaped, with inline SVG charts).
"""
