"""Pipeline stages: each reads tables (or landing files), applies transforms and models, writes tables."""
