"""A gallery's vectors in a Milvus collection: the same small interface as :class:`cbir.index.backend.FaissBackend`.

``--store milvus:URI`` keeps the vectors, ids, names and labels in a Milvus collection; cbir's manifest, features and
learned state stay in the index folder, which holds a small pointer file (:data:`POINTER_FILE`: URI, collection, spec).

* ``URI`` is a Milvus Lite database (a path ending in ``.db``, embedded in the process: ``milvus:./gallery.db``) or a
  server (``milvus:http://host:19530``, ``https://``, ``tcp://``, ``unix:``). Credentials are never recorded: a server
  that needs them reads ``$MILVUS_TOKEN`` (``user:password`` or an API key).
* Float descriptors: a ``FLOAT_VECTOR`` field searched by inner product of L2-normalised vectors, exactly the scores of
  FaissBackend's cosine index (``FLAT`` gives the same ranking as faiss flat). ``ivf`` / ``hnsw`` / ``sq8`` / ``pq``
  map to IVF_FLAT, HNSW, IVF_SQ8 / HNSW_SQ and IVF_PQ; Hamming codes to ``BINARY_VECTOR`` with BIN_FLAT /
  BIN_IVF_FLAT, scored ``1 - hamming / bits`` like FaissBackend.
* Milvus Lite has no binary vectors and no product quantisation: ``hash`` (Hamming) and ``--codec pq`` are refused
  there with a message naming the alternatives (those two mappings need a server: present, not testable here).
  Lite is also limited to an exact flat scan: pymilvus 3 sends IVF/HNSW build parameters in a form milvus-lite 3.2
  does not read (it would build 128 lists whatever ``--nlist`` says), so ``--ann ivf|hnsw`` / ``--codec sq8`` are
  refused there too (measured: IVF with nprobe 16 found 36 % of the exact top 10). :func:`auto_store_spec` picks
  what a store can take.
  Milvus keeps descriptors as they are, so a PCA (``--dim`` below the descriptor's dimension) is refused everywhere,
  as is ``float16`` (not mapped).
* Milvus Lite (milvus-lite 3.x) runs inside the process that opens the ``.db`` folder and locks it: a second process
  (a ``cbir query`` while ``cbir serve`` holds it) gets a :class:`CbirError` saying so; a server has no such limit.
* At most :data:`MAX_TOPK` results per query (Milvus' own limit); ask for fewer (``--max-rank``) on larger galleries.

pymilvus (and milvus-lite for ``.db`` URIs) are imported only when a Milvus store is used: ``pip install 'cbir[milvus]'``.

The modules: :mod:`~cbir.index.milvus.connection` (URIs, clients, dropping), :mod:`~cbir.index.milvus.spec` (what a store
can take, Milvus index parameters), :mod:`~cbir.index.milvus.collection` (:class:`MilvusBackend`).
"""

from .collection import MAX_TOPK, POINTER_FILE, MilvusBackend
from .connection import collection_name, connect, drop_collection, is_lite, milvus_available, parse_store, release_lite
from .spec import auto_store_spec, check_spec, index_params

__all__ = ["MilvusBackend", "parse_store", "collection_name", "check_spec", "auto_store_spec", "index_params", "connect", "drop_collection",
           "release_lite", "milvus_available", "is_lite", "POINTER_FILE", "MAX_TOPK"]
