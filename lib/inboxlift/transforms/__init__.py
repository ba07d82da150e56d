"""Pure ``DataFrame -> DataFrame`` steps: cleaning, features, planning, reporting.

Transforms never read or write tables and never build a session: a stage reads
what they need and passes it in.
"""
