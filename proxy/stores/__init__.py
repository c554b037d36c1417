"""State that outlives a transaction: consent records, rate-limit buckets.

Each store is a small interface with an embedded default (SQLite, memory) for one
instance and a scale-out backend (PostgreSQL, Redis) shared by several instances.
"""
