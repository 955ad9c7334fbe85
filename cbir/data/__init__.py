"""Images in: file lists and datasets.yaml, robust decoding under limits, decoding ahead in threads, batching.

Images travel through cbir as RGB ``uint8`` arrays of shape ``(H, W, 3)``. The modules:

* :mod:`cbir.data.lists`: file lists (``Entry``, ``read_file_list``, ``list_name``, ``dedupe``, ``file_stat``);
* :mod:`cbir.data.datasets`: datasets.yaml (``load_dataset``, ``apply_split``);
* :mod:`cbir.data.decode`: decoding (``decode_image``, ``decode_bytes``, ``resize_max_side``) and its process-wide
  limits (``set_limits``; the current ones are ``cbir.data.decode.MAX_PIXELS`` / ``MAX_BYTES``);
* :mod:`cbir.data.prefetch`: ``iter_decoded`` (threads, bounded look-ahead), ``shape_batches`` and ``batches``.

Their public names are importable from ``cbir.data`` as well.
"""

from .datasets import Dataset, apply_split, find_datasets_yaml, load_dataset, load_datasets_yaml
from .decode import DEFAULT_MAX_PIXELS, decode_bytes, decode_image, resize_max_side, set_limits
from .lists import Entry, dedupe, file_stat, list_name, natural_key, read_file_list
from .prefetch import batches, iter_decoded, shape_batches

__all__ = [
    "Entry", "natural_key", "read_file_list", "list_name", "dedupe", "file_stat",
    "Dataset", "find_datasets_yaml", "load_datasets_yaml", "load_dataset", "apply_split",
    "DEFAULT_MAX_PIXELS", "set_limits", "decode_image", "decode_bytes", "resize_max_side",
    "iter_decoded", "shape_batches", "batches",
]
