"""The ``corral`` command line: a thin client of the SDK, plus ``corral server``."""

__all__: list[str] = []
