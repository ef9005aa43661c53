"""A small shop API that shows every entry point of django-idempotency."""
