"""A benchmark of django-idempotency: run ``python benchmarks/run.py --help``."""
