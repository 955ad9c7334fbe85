"""cbir: content-based image retrieval: global descriptors, faiss indexes, geometric re-ranking, honest metrics.

The Python API mirrors the command line::

    import cbir
    index = cbir.build_index(cbir.load_dataset("demo").gallery, "indexes/demo")
    hits = cbir.load_index("indexes/demo").query_images(["some.jpg"], top_k=10)
    report = cbir.evaluate("indexes/demo", dataset="demo")
"""

__version__ = "0.1.0"

_API = {
    "build_index": "engine",
    "load_index": "engine",
    "evaluate": "engine",
    "train_head": "engine",
    "load_dataset": "data",
    "read_file_list": "data",
    "read_images": "folders",
    "scan_folder": "folders",
    "decode_image": "data",
}


def __getattr__(name):  # lazy: `import cbir` stays cheap and never imports torch
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module 'cbir' has no attribute {name!r}")
