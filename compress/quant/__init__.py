"""Numeric formats, one file each (fp8.py, ...), each starting with its pure tensor functions.

Importing this package registers the formats' checkpoint weight decoders.
"""

from moepress.compress import quantize  # noqa: F401,E402  (modelopt-layout decoder and fake-quant preparer)
from moepress.compress.quant import fp8  # noqa: F401
