"""One module per exported model (as LightGlue keeps one file per model): its graph, its spec and its factory together.

* a *graph* is a tensor-only ``nn.Module`` around cbir's or kornia's network (``pooled_graph``, ``xfeat_dense``, ...);
* a *spec* (:class:`~cbir.export.spec.ExportSpec`) adds example inputs, dynamic axes and the model's identity, the
  key of its cached export (:mod:`cbir.export.runtime`);
* a *factory* builds the spec from ``--weights``, ``--conf`` and ``--matcher-weights``; each module registers its
  factories in :data:`MODELS` under the names ``cbir export onnx --model`` takes.

======================  ======================================  ==================================================
module                  models                                  graph
======================  ======================================  ==================================================
:mod:`.pooled`          ``pooled:BACKBONE``, ``BACKBONE``       the whole ``pooled`` descriptor
:mod:`.xfeat`           ``local:xfeat``                         XFeat's dense maps
:mod:`.aliked`          ``local:aliked``, ``local:aliked-n16rot``  ALIKED's dense maps
:mod:`.disk`            ``local:disk``                          DISK's dense maps
:mod:`.lightglue`       ``lightglue``, ``lighterglue``          LightGlue without adaptive depth or width
:mod:`.spsg`            ``superpoint+superglue``, ``spsg``      SuperPoint + SuperGlue, one graph
:mod:`.loftr`           ``loftr``                               LoFTR whole
======================  ======================================  ==================================================

:mod:`.local` holds what the three dense-map exports of local features share.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from ...registry import Registry
from ..spec import ExportSpec

#: model name -> factory(weights=None, conf=None, matcher_weights=None) -> ExportSpec; the modules below register
#: themselves when first looked up
MODELS: Registry = Registry("ONNX model", plugins=tuple(f"{__name__}.{m}" for m in
                                                        ("pooled", "xfeat", "aliked", "disk", "lightglue", "spsg", "loftr")))


def model_names() -> List[str]:
    """Every exportable model name, sorted."""
    return MODELS.names()


def build_spec(name: str, weights=None, conf: Optional[Dict[str, Any]] = None, matcher_weights=None) -> ExportSpec:
    """The export spec of model ``name`` (see :func:`model_names`), weights resolved offline."""
    return MODELS.get(name)(weights=weights, conf=conf, matcher_weights=matcher_weights)
