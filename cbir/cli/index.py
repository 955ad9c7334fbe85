"""``cbir index build|info|add|remove|compact|verify``: write, inspect and update index folders."""

from __future__ import annotations

import json

from ..cliutil import non_negative_int, positive_int, tty_safe
from ..errors import CbirError

from .common import (parse_graph_arg as _graph_arg, add_common as _add_common, add_source as _add_source, add_extractor as _add_extractor, extractor_from_args as _extractor_from_args, entries_from_args as _entries, add_search_structure as _add_search_structure, search_opts_from_args as _search_opts, print_update_summary as _update_summary)


def cmd_index_build(a) -> int:
    from ..engine import build_index

    name, conf = _extractor_from_args(a)
    entries, ds, label_names = _entries(a)
    roots = [a.root] if getattr(a, "root", None) else ([ds["folder"]] if "folder" in ds else [])
    rep = build_index(entries, a.out, extractor=name, conf=conf, roots=roots, strict=a.strict, batch_size=a.batch_size, workers=a.workers,
                      ann=a.ann, search=_search_opts(a), progress=not a.quiet, dataset=ds, label_names=label_names, local=a.local,
                      keep_raw=a.keep_raw, ray=a.ray, vector_store=a.store, graph=_graph_arg(a.graph, "--graph"))
    m = rep.manifest
    summary = {
        "index": str(rep.out), "extractor": name, "images": rep.count, "failed": len(rep.failures),
        "extracted": rep.extracted, "reused": rep.reused, "dim": m["dim"], "metric": m["metric"],
        "seconds": rep.seconds, "failures": rep.failures,
    }
    if "folder" in ds:
        summary["folder"] = {k: ds[k] for k in ("folder", "skipped", "labels")}
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


def cmd_index_add(a) -> int:
    from ..engine import add_images

    entries, _, _ = _entries(a)
    rep = add_images(a.index, entries, strict=a.strict, batch_size=a.batch_size, workers=a.workers, progress=not a.quiet)
    return _update_summary(a, rep, f"{rep.added} added, {len(rep.skipped)} already there, {len(rep.failures)} unreadable")


def cmd_index_remove(a) -> int:
    from ..data import read_file_list
    from ..engine import remove_images

    names = list(a.names)
    if a.list:
        names += read_file_list(a.list)  # entries: matched by name, else by file
    if not names:
        raise CbirError("name the images to remove: NAME... or --list FILE (names as listed at build)")
    rep = remove_images(a.index, names)
    return _update_summary(a, rep, f"{rep.removed} removed, {len(rep.skipped)} not found")


def cmd_index_sync(a) -> int:
    from ..sync import sync_index

    rep = sync_index(a.index, a.folder, labels=a.labels or "auto", batch_size=a.batch_size, workers=a.workers,
                     progress=not a.quiet, dry_run=a.dry_run)
    if a.json:
        print(json.dumps(rep.as_json(), indent=2))
        return 0
    verb = "would change" if rep.dry_run else "synced with"
    print(tty_safe(f"index {rep.index}: {verb} {rep.folder}: {len(rep.added)} added, {len(rep.changed)} changed, "
                   f"{len(rep.removed)} removed, {len(rep.failed)} failed, {rep.unchanged} unchanged"
                   + (f" ({len(rep.touched)} touched, same content)" if rep.touched else "") + f"; {rep.count} images ({rep.seconds:.1f} s)"))
    for what, names in (("added", rep.added), ("changed", rep.changed), ("removed", rep.removed)):
        for n in names[:20]:
            print(f"  {what:<8} {tty_safe(n)}")
        if len(names) > 20:
            print(f"  ... and {len(names) - 20} more {what}")
    for f in rep.failed:
        print(f"  failed   {tty_safe(f['name'])}: {tty_safe(f['cause'])}")
    return 0


def cmd_index_compact(a) -> int:
    from ..engine import compact_index

    rep = compact_index(a.index)
    return _update_summary(a, rep, f"search structure rebuilt ({rep.removed} tombstone(s) dropped)")


def cmd_index_verify(a) -> int:
    from ..engine import verify_index

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
    from ..index.backend import index_summary
    from ..index.folder import read_manifest
    from ..index.gallery import check_shapes
    from ..index.verify import check_sizes

    m = read_manifest(a.index)
    check_sizes(a.index, m)  # a missing, cut or replaced file is named here (`index verify` also checks every byte)
    if not m.get("store"):
        check_shapes(a.index, m)  # and counts or dimensions the features do not hold
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
        g, kn = m.get("graph"), m.get("knn") or {}
        print("graph stage: " + (json.dumps(g) + (f" (k-NN graph of {kn['k']} per image in {kn.get('file')})" if kn.get("k") else "")
                                 if g else "none (plain top-k)"))
    return 0


def register(sub, add_common=None) -> None:
    """Add this module's sub-command(s) to the main parser."""
    pi = sub.add_parser("index", help="build or inspect an index", description="Build or inspect an index folder.")
    isub = pi.add_subparsers(dest="index_command", metavar="SUBCOMMAND")
    isub.required = True
    b = isub.add_parser("build", help="extract descriptors of a gallery and write an index folder",
                        description="Extract descriptors of every image of a folder, list or dataset and write an index folder "
                                    "(manifest.json, features.h5, faiss file). Re-running into the same folder resumes: images already "
                                    "extracted with the same extractor (same path, size and mtime) are reused. Bad images are reported and skipped.")
    _add_source(b, positional=True)
    _add_extractor(b, "global descriptor")
    b.add_argument("--out", required=True, metavar="DIR", help="index folder to write (replaced as a whole when complete)")
    b.add_argument("--strict", action="store_true", help="stop at the first unreadable image and write no index")
    _add_search_structure(b)
    b.add_argument("--local", metavar="FEATURES", help="also store local features for re-ranking (local.h5): default (RootSIFT, 256 "
                   "keypoints, 24-d float16: 15 KB per image), xfeat-compact, or an extractor: xfeat, aliked, disk, sift, rootsift. "
                   "Seconds per 1024 px photo on 2 CPU cores: default 0.19, sift/rootsift 0.10, xfeat 0.11, aliked 2.1, disk 4.1 "
                   "(dense CNNs at 1024 px; benchmarks/local_speed.py)")
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
    sy = isub.add_parser("sync", help="bring an index built from a folder in step with it (new, changed, deleted files)",
                         description="Compare the folder an index was built from (or FOLDER) with the index: new files are extracted "
                                     "and added, changed ones (size or mtime differ and the SHA-256 differs from the one recorded) "
                                     "extracted again, deleted ones removed, through the same atomic, locked steps as `index add` and "
                                     "`index remove`. Killed, it resumes on the next run. A sync with nothing to do decodes no image.")
    sy.add_argument("index", metavar="INDEX")
    sy.add_argument("folder", nargs="?", metavar="FOLDER", help="the image folder (default: the one the index was built from)")
    sy.add_argument("--labels", choices=["folder"], help="label new images by their top-level sub-folder (default: as at build)")
    sy.add_argument("--dry-run", action="store_true", help="only say what would be added, changed and removed")
    sy.add_argument("--batch-size", type=positive_int, default=16, help="images per network batch (default: %(default)s)")
    sy.add_argument("--workers", type=non_negative_int, default=2, help="image decoding threads (default: %(default)s)")
    sy.add_argument("--json", action="store_true", help='print {"added": [...], "changed": [...], "removed": [...], "failed": [...], ...}')
    _add_common(sy)
    sy.set_defaults(func=cmd_index_sync)
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
