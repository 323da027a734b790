"""backend_stub: a fast HTTP/1.1 upstream for demos, integration tests and benchmarks.

Raw asyncio Protocols and httptools on uvloop; never imported by ``proxy/``.
Run it with ``python -m backend_stub --host 127.0.0.1 --port 8080 [--workers N]``.
"""
