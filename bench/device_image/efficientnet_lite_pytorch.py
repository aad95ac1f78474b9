"""Put first on PYTHONPATH by `bench/gpu_check.sh --rehearse`: the device image has no
`efficientnet_lite_pytorch`, so the rehearsal runs without it too."""

raise ImportError("efficientnet_lite_pytorch is not on the device image "
                  "(hidden by bench/device_image)")
