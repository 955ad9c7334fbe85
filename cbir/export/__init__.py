"""Deployment without PyTorch: ONNX export of cbir's networks and onnxruntime inference.

* :mod:`cbir.export.onnx`: one exporter per model name (:data:`~cbir.export.onnx.MODELS`), tensor-only wrappers
  whose graphs keep image sizes and point counts dynamic, :func:`~cbir.export.onnx.export_model`.
* :mod:`cbir.export.runtime`: the ``runtime`` switch (``torch`` | ``onnx``) read by the pooled extractor, the local
  features and the matchers, a cache of exported models (``$CBIR_ONNX_CACHE``, default ``~/.cache/cbir/onnx``) and
  the onnxruntime sessions.
* :mod:`cbir.cli.export`: ``cbir export onnx --model NAME --out FILE.onnx``.

Nothing here imports onnx or onnxruntime until it is used (``pip install 'cbir[onnx]'``).
"""
