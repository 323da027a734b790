"""Authentication steps: bearer JWTs verified in the proxy (`jwt`, keys from `jwks`) and opaque tokens
checked against an RFC 7662 endpoint (`introspect`), both behind the compiled per-worker token cache
and route step of `step`."""
