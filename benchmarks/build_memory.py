"""Peak RSS of the default build: flat in the collection size, bounded by image size x batch.

1. Collection size: ``cbir index build --list`` over 1,000 / 2,000 / 4,000 / 8,000 entries of one size (the Corel
   photos, 384x256, repeated under other names through symbolic links), each build a child process whose own peak
   RSS is read from ``wait4``; the ratio of each to the 1,000 build's.
2. Image size x batch: the Paris photos (1024x768) and 12-megapixel copies of them (4000x3000, made here at run
   time), 200 entries each, at ``--batch-size`` 4, 16 and 32.

    python benchmarks/build_memory.py [--sizes 1000 2000 4000 8000] [--json benchmarks/results/build_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
COREL = REPO.parent / "shared" / "data" / "category_wang_corel1k" / "images"


def _cbir() -> str:
    exe = Path(sys.executable).with_name("cbir")
    return str(exe) if exe.exists() else "cbir"


def peak_build(list_file: Path, out: Path, *extra: str) -> dict:
    """(seconds, peak RSS MiB) of one `cbir index build` child."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([_cbir(), "index", "build", "--list", str(list_file), "--out", str(out), "--quiet", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"build of {list_file} failed (rc {proc.returncode}): {err.strip()[-300:]}")
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": round(time.perf_counter() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def by_count(sizes, tmp: Path) -> dict:
    img = tmp / "img"
    img.mkdir()
    names = []
    photos = sorted(COREL.glob("*.jpg"), key=lambda p: int(p.stem))
    for rep in range((max(sizes) + len(photos) - 1) // len(photos)):
        for p in photos:
            link = img / f"r{rep}_{p.name}"
            link.symlink_to(p)
            names.append(link)
    rows = {}
    for n in sizes:
        lst = tmp / f"{n}.txt"
        lst.write_text("".join(f"{p}\n" for p in names[:n]))
        rows[str(n)] = peak_build(lst, tmp / f"i{n}")
        print(f"count {n}: {rows[str(n)]}", flush=True)
    base = rows[str(min(sizes))]["peak_rss_mib"]
    for r in rows.values():
        r["over_smallest"] = round(r["peak_rss_mib"] / base, 3)
    return rows


def by_image_size(tmp: Path, n: int, batches) -> dict:
    import cv2

    from cbir.data import load_dataset

    paris = [e.path for e in load_dataset("paris6k_subset").gallery][:n]
    big = tmp / "12mp"
    big.mkdir()
    for p in paris:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        cv2.imwrite(str(big / (Path(p).stem + ".jpg")), cv2.resize(img, (4000, 3000), interpolation=cv2.INTER_CUBIC),
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    sets = {"paris 1024x768": paris, "paris 12MP 4000x3000": sorted(big.glob("*.jpg"))}
    rows = {}
    for name, files in sets.items():
        lst = tmp / f"{name.split()[1]}.txt"
        lst.write_text("".join(f"{p}\n" for p in files))
        for b in batches:
            key = f"{name}, batch {b}"
            rows[key] = {"images": len(files), **peak_build(lst, tmp / "isz", "--batch-size", str(b))}
            print(f"size {key}: {rows[key]}", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    ap.add_argument("--image-size-images", type=int, default=120, help="entries of the image-size rows (0: skip them)")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 16, 32])
    ap.add_argument("--json", type=Path, default=HERE / "results" / "build_memory.json")
    a = ap.parse_args(argv)
    if not COREL.is_dir():
        raise SystemExit(f"{COREL}: the Corel photos are needed")
    tmp = Path(tempfile.mkdtemp(prefix="cbir-build-memory-"))
    try:
        res = {"created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "by_count": by_count(a.sizes, tmp)}
        if a.image_size_images:
            res["by_image_size"] = by_image_size(tmp, a.image_size_images, a.batches)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
