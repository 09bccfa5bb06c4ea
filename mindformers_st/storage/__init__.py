"""storage/: safetensors files — strict header parsing, memory-mapped block reads, a streaming
writer with atomic commit, per-tensor checksums and checkpoint index files. Knows nothing about
parallelism; see docs/storage.md."""
from .checksum import has_checksums, verify_checksums
from ..dtypes import ST_TO_NUMPY, numpy_to_st
from .index import (HF_INDEX, MS_INDEX, WeightIndex, atomic_write_text, read_index, shard_file_name,
                    write_index)
from .reader import SafetensorsFile, TensorEntry, open_safetensors, read_header
from .writer import SafetensorsWriter, load_tensors, save_tensors

__all__ = [
    "ST_TO_NUMPY", "numpy_to_st", "TensorEntry", "SafetensorsFile", "open_safetensors", "read_header",
    "SafetensorsWriter", "save_tensors", "load_tensors", "verify_checksums", "has_checksums",
    "HF_INDEX", "MS_INDEX", "WeightIndex", "read_index", "write_index", "atomic_write_text",
    "shard_file_name",
]
