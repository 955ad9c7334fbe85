"""Deployment without PyTorch: ONNX export of cbir's networks and onnxruntime inference.

* :mod:`cbir.export.onnx`: :func:`~cbir.export.onnx.export_model`, the entry point (graphs that keep image sizes
  and point counts dynamic, what each holds);
* :mod:`cbir.export.models`: one module per exported model (its graph, spec and factory), registered by name in
  :data:`~cbir.export.models.MODELS`;
* :mod:`cbir.export.patches`: trace-safe forwards of kornia's and torch's modules, swapped in during an export;
* :mod:`cbir.export.spec`: :class:`~cbir.export.spec.ExportSpec`, the opset; :mod:`cbir.export.write`: writing a
  spec as a file and checking it against torch;
* :mod:`cbir.export.runtime`: the ``runtime`` switch (``torch`` | ``onnx``) read by the pooled extractor, the local
  features and the matchers, a cache of exported models (``$CBIR_ONNX_CACHE``, default ``~/.cache/cbir/onnx``) and
  the onnxruntime sessions.
* :mod:`cbir.cli.export`: ``cbir export onnx --model NAME --out FILE.onnx``.

Nothing here imports onnx or onnxruntime until it is used (``pip install 'cbir[onnx]'``).
"""
