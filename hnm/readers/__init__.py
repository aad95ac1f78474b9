"""Reading every input format into records and image references: JSON/JSONL, CSV/TSV,
Parquet, WebDataset tar shards, Hugging Face datasets saved with `save_to_disk` and AVDN
pickled chunks.

`base` holds the types every reader shares, `files` finds the input's files and format,
`source` reads them a block at a time (`Input`, `read_blocks`) or all into one
`Source`, one module per format reads its files
(`jsonl`, `delimited`, `parquet`, `hf`, `webdataset`, `avdn`), and `images` reads an
image's bytes from its shard when needed. The names below are what the rest of hnm uses.
"""

from hnm.readers.avdn import check_normalization, read_tensor, tensor_png, to_image
from hnm.readers.base import ImageRef, Part, Shard, Source
from hnm.readers.files import SHARD_FORMATS, detect_format, find_shards, reads_tensors
from hnm.readers.images import holds_tensor, image_stream, payload, read_image
from hnm.readers.source import BLOCK_ROWS, Input, read_blocks, read_input

__all__ = ["BLOCK_ROWS", "SHARD_FORMATS", "ImageRef", "Input", "Part", "Shard", "Source",
           "check_normalization",
           "detect_format",
           "find_shards", "holds_tensor", "image_stream", "payload", "read_image",
           "read_blocks", "read_input", "read_tensor", "reads_tensors", "tensor_png", "to_image"]
