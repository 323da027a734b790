"""uvgate: a multi-process API gateway on uvloop, httptools and h2."""

__version__ = "0.1.0"
