"""Put first on PYTHONPATH by `bench/gpu_check.sh --rehearse`: the device image has no
`faiss`, so the rehearsal runs without it too."""

raise ImportError("faiss is not on the device image (hidden by bench/device_image)")
