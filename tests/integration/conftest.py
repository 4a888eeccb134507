"""Integration tests share the session server and leak check defined in tests/conftest.py."""
