"""auth_stub: a token issuer for demos, integration tests and benchmarks.

Mints HS256/RS256/ES256 JWTs, publishes a JWKS with key rotation and a grace period, and
answers RFC 7662 introspection. Keys live in memory only, so it always runs as one process.
Never imported by ``proxy/``. Run it with ``python -m auth_stub --host 127.0.0.1 --port 8090``.
"""
