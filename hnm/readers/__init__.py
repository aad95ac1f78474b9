"""Reading every input format into records and image references."""

from hnm.readers.webdataset import (
    SHARD_FORMATS,
    ImageRef,
    Part,
    Shard,
    Source,
    detect_format,
    find_shards,
    holds_tensor,
    image_stream,
    payload,
    read_image,
    read_input,
    read_tensor,
    reads_tensors,
    tensor_png,
)

__all__ = ["SHARD_FORMATS", "ImageRef", "Part", "Shard", "Source", "detect_format",
           "find_shards", "holds_tensor", "image_stream", "payload", "read_image",
           "read_input", "read_tensor", "reads_tensors", "tensor_png"]
