"""``semantic``: softmax class probabilities of a classifier (seed 003).

Either a head on frozen base descriptors: ``cbir train`` fits it on a labelled list (transfer learning:
the base is frozen) and saves it as HDF5: the base extractor's config, the class labels and the layer
weights (no pickle); the index records which head (its SHA-256) described the gallery. Or a trained
classifier network given as ``backbone`` (``paddle-jit:PREFIX``, ``paddle:mobilenet_v2`` or
``mobilenet_v2``/``resnet*`` with a checkpoint that keeps its classifier): the softmax of its logits, as
the seed does with its Paddle model (classes are then the classifier's output indices).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence

import numpy as np

from ..errors import CbirError
from .base import EXTRACTORS, Extractor, make_extractor

HEAD_FORMAT = 1


def fit_head(X: np.ndarray, labels: Sequence[str], hidden: int = 0, epochs: int = 300, weight_decay: float = 1e-2,
             lr: float = 1e-2, seed: int = 0) -> Dict[str, Any]:
    """Multinomial logistic regression (or a one-hidden-layer MLP) on L2-normalised rows, full-batch Adam."""
    import torch

    classes = sorted(set(labels), key=lambda s: (len(s), s))
    if len(classes) < 2:
        raise CbirError(f"a head needs at least 2 classes, the list has {len(classes)}")
    cidx = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([cidx[l] for l in labels])
    x = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
    mu = x.mean(0)
    sd = x.std(0).clamp(min=1e-6)
    g = torch.Generator().manual_seed(seed)
    layers: List[torch.nn.Module] = []
    d = x.shape[1]
    if hidden:
        layers += [torch.nn.Linear(d, hidden), torch.nn.ReLU()]
        d = hidden
    layers.append(torch.nn.Linear(d, len(classes)))
    net = torch.nn.Sequential(*layers)
    with torch.no_grad():
        for m in net:
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / np.sqrt(m.weight.shape[1])))
                m.bias.zero_()
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    xs = (x - mu) / sd
    for _ in range(epochs):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xs), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((net(xs).argmax(1) == y).float().mean())
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    return {
        "classes": classes,
        "mean": mu.numpy(),
        "std": sd.numpy(),
        "layers": [(m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()) for m in linears],
        "train_accuracy": round(acc, 4),
    }


def save_head(head: Dict[str, Any], path: os.PathLike) -> None:
    import h5py

    tmp = f"{path}.tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = "cbir-head"
        f.attrs["format_version"] = HEAD_FORMAT
        f.attrs["classes"] = json.dumps(head["classes"])
        f.attrs["base"] = json.dumps(head["base"])
        f.attrs["label_names"] = json.dumps(head.get("label_names") or {})
        f.attrs["train"] = json.dumps(head.get("train") or {})
        f.create_dataset("mean", data=head["mean"])
        f.create_dataset("std", data=head["std"])
        for i, (w, b) in enumerate(head["layers"]):
            f.create_dataset(f"layer{i}/weight", data=w)
            f.create_dataset(f"layer{i}/bias", data=b)
    os.replace(tmp, path)


def load_head(path: os.PathLike) -> Dict[str, Any]:
    import h5py

    if not os.path.isfile(path):
        raise CbirError(f"{path}: head file not found (make one with `cbir train`)")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != "cbir-head":
                raise CbirError(f"{path}: not a cbir head file")
            n = len([k for k in f if k.startswith("layer")])
            return {
                "classes": json.loads(f.attrs["classes"]),
                "base": json.loads(f.attrs["base"]),
                "label_names": json.loads(f.attrs.get("label_names", "{}")),
                "train": json.loads(f.attrs.get("train", "{}")),
                "mean": f["mean"][()],
                "std": f["std"][()],
                "layers": [(f[f"layer{i}/weight"][()], f[f"layer{i}/bias"][()]) for i in range(n)],
            }
    except OSError as e:
        raise CbirError(f"{path}: unreadable head file ({e})") from None


def head_logits(head: Dict[str, Any], x: np.ndarray) -> np.ndarray:
    h = (np.asarray(x, np.float32) - head["mean"]) / head["std"]
    layers = head["layers"]
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    return h


def softmax(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = z / temperature
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True)).astype(np.float32)


@EXTRACTORS.register("semantic")
class SemanticExtractor(Extractor):
    name = "semantic"
    default_conf = {"head": None, "temperature": 1.0, "max_side": None,
                    # a classifier network instead of a head (its options as in ``pooled``)
                    "backbone": None, "weights": None, "backbone_conf": {}, "input_size": None}
    _NET_KEYS = ("backbone", "weights", "backbone_conf", "input_size")

    @classmethod
    def conf_from_options(cls, opts) -> Dict[str, Any]:
        """A trained head (``--head FILE``), or a classifier network's softmax (``--backbone``, seed 003)."""
        popts = opts.pooled
        if opts.head is None and opts.backbone is not None:
            if opts.pool is not None or opts.scales is not None:
                raise CbirError("--extractor semantic with --backbone uses the classifier's softmax; drop --pool/--scales")
            return {k: v for k, v in popts.items() if k in ("backbone", "weights")}
        if opts.head is None:
            raise CbirError("--extractor semantic needs --head FILE (train one with `cbir train`) or a classifier "
                            "--backbone (paddle-jit:PREFIX, or paddle:mobilenet_v2 / mobilenet_v2 with --weights)")
        if popts:
            raise CbirError("--extractor semantic takes its backbone from the head file; drop --backbone/--weights/--pool/--scales")
        return {"head": opts.head}

    def __init__(self, conf=None) -> None:
        super().__init__(conf)
        self._net = None
        if self.conf["backbone"]:
            if self.conf["head"]:
                raise CbirError("semantic: give a head (--head) or a classifier backbone (--backbone), not both")
            self.head = None
            self.base = None
            from ..models.backbones import backbone_defaults

            given = set(conf or {})
            for k, v in backbone_defaults(self.conf["backbone"]).items():  # paddle:*: images as stored, as the seed
                if k in self.default_conf and k not in given:
                    self.conf[k] = v
                    given.add(k)
            if "max_side" not in given and not self.conf["input_size"]:
                self.conf["max_side"] = 512
            return
        if any(self.conf[k] for k in self._NET_KEYS):
            raise CbirError("semantic: weights/backbone_conf/input_size go with a classifier backbone; a head brings its own base")
        if not self.conf["head"]:
            raise CbirError("semantic: needs a head (train one with `cbir train ... --out HEAD` and pass --head HEAD) "
                            "or a classifier backbone (--backbone paddle-jit:PREFIX, or paddle:mobilenet_v2 / mobilenet_v2 with --weights)")
        self.conf["head"] = os.path.abspath(self.conf["head"])
        self.head = load_head(self.conf["head"])
        b = self.head["base"]
        self.base = make_extractor(b["name"], b["conf"])
        if self.conf["max_side"] is None:
            self.conf["max_side"] = self.base.max_side

    @property
    def net(self):
        """The classifier backbone (``backbone`` mode), built on first use."""
        if self._net is None:
            from ..models.backbones import build_backbone

            net = build_backbone(self.conf["backbone"], weights=self.conf["weights"], options=self.conf["backbone_conf"] or None)
            if not int(getattr(net, "num_classes", 0) or 0) or not hasattr(net, "classify"):
                raise CbirError(f"semantic: backbone {self.conf['backbone']!r} has no classifier (its weights keep none); "
                                "use --extractor pooled, or train a head with `cbir train`")
            self._net = net
        return self._net

    @property
    def classes(self) -> List[str]:
        if self.head is None:
            return [str(i) for i in range(self.dim)]
        return list(self.head["classes"])

    @property
    def dim(self) -> int:
        if self.head is None:
            return int(self.net.num_classes)
        return len(self.head["classes"])

    def weights(self) -> Dict[str, str]:
        from ..weights import cached_sha256

        if self.head is None:
            return dict(self.net.weights_sha)
        return {**self.base.weights(), "head": cached_sha256(self.conf["head"])}

    def identity(self, with_state: bool = True) -> Dict[str, Any]:
        ident = super().identity(with_state)
        if self.head is None:
            ident["conf"] = {k: v for k, v in self.conf.items() if k != "head" and (v or k not in ("backbone_conf", "input_size"))}
            return ident
        # the index keeps a copy of the head (see bundle()); its checksum identifies it, not its path
        ident["conf"] = {k: v for k, v in {**self.conf, "head": "@head"}.items() if k not in self._NET_KEYS}
        return ident

    def bundle(self) -> Dict[str, str]:
        return {"head": self.conf["head"]} if self.head is not None else {}

    def logits(self, images: List[np.ndarray]) -> np.ndarray:
        if self.head is not None:
            return head_logits(self.head, self.base.describe(images))
        from .batching import images_to_batches, resize_to, torch_inference

        net = self.net
        images = resize_to(images, self.conf["input_size"] or getattr(net, "input_size", None))
        out = np.zeros((len(images), self.dim), np.float32)
        with torch_inference():
            for idx, batch in images_to_batches(images):
                out[idx] = net.classify(batch).float().numpy()
        return out

    def extract(self, images: List[np.ndarray]) -> np.ndarray:
        if self.head is None and getattr(self.net, "probabilities", False):
            return self.logits(images)  # the program ends with a softmax already
        return softmax(self.logits(images), float(self.conf["temperature"]))

    def post(self, raw: np.ndarray) -> np.ndarray:
        # softmax probabilities are the descriptor, compared by cosine as in the seed
        return np.asarray(raw, np.float32)
