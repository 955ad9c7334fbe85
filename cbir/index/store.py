"""The index format's names in one namespace, for callers written before it was split (``from cbir.index import store``).

The format lives in small modules, each owning one thing: :mod:`~cbir.index.atomic` (atomic writes),
:mod:`~cbir.index.rows` (feature rows), :mod:`~cbir.index.manifest` (the manifest: layout, schema, the one builder),
:mod:`~cbir.index.folder` (work folder, lock, swap and recovery) and :mod:`~cbir.index.verify` (checksums).
New code imports from those; this module only re-exports them (still used as ``store.NAME`` by ``cbir/query.py`` and a
few tests: tests/test_engine.py, tests/test_distributed.py, tests/models/test_paddle.py, tests/reliability/test_service.py).
"""

from .atomic import SafeFile, WriteError, h5_writing, write_error, write_faiss, write_json_atomic, writing  # noqa: F401
from .folder import (BuildLock, Kept, Locked, check_out, check_space, claim_work, clear_work, commit_folder,  # noqa: F401
                     folder_bytes, foreign_entry, fresh_folder, is_index_folder, locked_update, owned_name, partial_dir,
                     read_manifest, recover)
from .manifest import (ANNS, FAISS_FILES, FEATURES, FORMAT_VERSION, KINDS, LOCAL_FILE, MANIFEST, MANIFEST_SUM,  # noqa: F401
                       MAX_COUNT, MAX_DIM, METRICS, MILVUS_FILE, OWNED_FILES, STATE_FILE, canonical_sha256, check_manifest,
                       load_manifest, manifest_digest, next_id, now_iso, validate_manifest, write_manifest)
from .rows import (FeatureWriter, LazyRows, Rows, RowSegments, load_state_file, read_rows, save_state,  # noqa: F401
                   str_dtype, write_arrays, write_features)
from .verify import check_sizes, damaged, file_record, file_sha256, open_checked, rebuild_hint, verify_file  # noqa: F401
