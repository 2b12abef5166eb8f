"""The checkpoint layer: the only code in moepress that opens model files.

- :mod:`.reader`: :class:`CheckpointReader` reads Hugging Face safetensors checkpoints lazily
  (one shard file or several through ``model.safetensors.index.json``) and decodes quantized
  weights through the format registry; :class:`LayerView` over a layer's tensors read ahead;
- :mod:`.writer`: :class:`CheckpointWriter` writes sharded checkpoints through a ``.partial``
  directory that is renamed into place only when complete, so an interrupted run never leaves
  something that looks finished;
- :mod:`.safetensors_io`: the safetensors dtype codes and :func:`write_safetensors`.

The O_DIRECT thresholds (``reader.DIRECT_MIN_BYTES``, ``safetensors_io.DIRECT_MIN_FILE_BYTES``)
live in the module that reads them; set them there.
"""

from moepress.compress.checkpoint.auxiliary import AUX_FILE_PATTERNS, aux_files
from moepress.compress.checkpoint.reader import (
    CheckpointReader,
    LayerView,
    TensorInfo,
    declared_dtype,
    decode_weight,
    read_config_file,
)
from moepress.compress.checkpoint.safetensors_io import DTYPE_NAMES, INDEX_NAME, SINGLE_NAME, write_safetensors
from moepress.compress.checkpoint.writer import CheckpointWriter, read_later

__all__ = ["AUX_FILE_PATTERNS", "DTYPE_NAMES", "INDEX_NAME", "SINGLE_NAME", "CheckpointReader", "CheckpointWriter",
           "LayerView", "TensorInfo", "aux_files", "declared_dtype", "decode_weight", "read_config_file",
           "read_later",
           "write_safetensors"]
