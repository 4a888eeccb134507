"""Runnable examples; a package so that tests can import and run their code."""
