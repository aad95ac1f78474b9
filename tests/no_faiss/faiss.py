"""Put first on PYTHONPATH (`make test-no-faiss`), this hides an installed FAISS: hnm then
runs as on a machine without it (exact search on torch, no IVF)."""

raise ImportError("faiss is hidden by tests/no_faiss (make test-no-faiss)")
