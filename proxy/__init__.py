"""uvgate: a multi-process API gateway on uvloop, httptools and h2."""

__version__ = "0.1.0"


def compiled() -> bool:
    """True when the hot-path modules run as mypyc-compiled C extensions (see setup.py)."""
    from proxy.http1 import protocol

    return not protocol.__file__.endswith(".py") if protocol.__file__ else False
