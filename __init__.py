"""pushgw: an async push delivery gateway (Redis Streams to APNs, FCM HTTP v1 and Web Push).

The repository root is the `pushgw` package (pyproject.toml maps it with package-dir), so the
top-level folders are its subpackages and every import inside the package is relative: tools that
resolve imports by file path (mypy, IDEs, import-graph tools) follow them without an install.
docs/architecture.md describes the floors and what each may import.
"""
