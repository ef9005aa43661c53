"""The example shop under gunicorn, for tests/test_multiprocess.py.

The server side (settings, URLs, fault-injection views, gunicorn config, the
database preparation) and the test side's harness (server process, HTTP
client, database inspection) live here; the scenarios live in the test module.
"""
