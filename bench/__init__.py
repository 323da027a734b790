"""Benchmarks for uvgate (`python -m bench`, `make bench`); not installed with the package."""
