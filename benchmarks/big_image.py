"""Peak memory and seconds of one huge PNG in a build and a query (issue 10, item 3).

The image is the one of the acceptance check: a 9400x9400 RGBA PNG (~470 KB on disk, 88 M pixels,
under cbir's 100 M pixel cap), made at run time in a temporary folder and deleted afterwards. Cases,
each a child process whose peak RSS is read with ``os.wait4`` (``ru_maxrss`` of that child alone):

* ``build``: ``cbir index build --list gbig.txt`` with big.png and 3 demo images (default extractor);
* ``query``: ``cbir query --index big-idx big.png``;
* ``decode``: ``decode_image(big.png, max_side=512)`` alone in a bare Python process;
* ``build_two_big_as6g`` (``--two``): two huge PNGs + 3 demo images under a 6 GiB address-space limit
  (``RLIMIT_AS``), the reporter's setting; before the fix it aborted the whole build.

Results are merged into ``benchmarks/results/big_image.json`` under ``--label`` (e.g. ``before`` /
``after``), so figures of earlier code stay beside the new ones.

    .venv/bin/python benchmarks/big_image.py --label after --two     # ~1-3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "results" / "big_image.json"
CBIR = REPO / ".venv" / "bin" / "cbir"
PY = REPO / ".venv" / "bin" / "python"
DEMO = REPO / "indexes" / "_datasets" / "demo" / "images"
SIDE = 9400

MAKE_BIG = (
    "import sys, numpy as np; from PIL import Image\n"
    f"a = np.zeros(({SIDE}, {SIDE}, 4), np.uint8); a[..., 0] = 200; a[..., 3] = 128; a[::7, ::5, 1] = 90\n"
    "Image.fromarray(a, 'RGBA').save(sys.argv[1])\n"
)


def run(cmd, cwd: Path, as_limit: int = 0) -> dict:
    """Run ``cmd``: seconds, exit status and output tails."""

    def limit():
        if as_limit:
            resource.setrlimit(resource.RLIMIT_AS, (as_limit, as_limit))

    t0 = time.perf_counter()
    p = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=limit)
    out, err = p.communicate()
    # RUSAGE_CHILDREN is a running max over every reaped child, so each case runs in a fresh wrapper (--child)
    return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 2), "stdout": out.decode()[-2000:], "stderr": err.decode()[-2000:]}


def measured(cmd, cwd: Path, as_limit: int = 0) -> dict:
    """``run`` inside a fresh wrapper process, so RUSAGE_CHILDREN's max is this command's peak alone."""
    wrapper = [PY, __file__, "--child", json.dumps({"cmd": [str(c) for c in cmd], "cwd": str(cwd), "as_limit": as_limit})]
    p = subprocess.run([str(c) for c in wrapper], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"wrapper failed: {p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def child(spec: dict) -> None:
    r = run(spec["cmd"], Path(spec["cwd"]), spec["as_limit"])
    r["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", default="after", help="key the results are stored under (before / after)")
    ap.add_argument("--two", action="store_true", help="also build with two huge PNGs under a 6 GiB address-space limit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(json.loads(a.child))
    demo = sorted(DEMO.glob("*.jpg"))[:3]
    if len(demo) < 3:
        raise SystemExit(f"{DEMO}: demo images missing; run `make demo` (or `cbir datasets --check`) first")
    res = {}
    with tempfile.TemporaryDirectory(prefix="cbir-big-") as tmp:
        t = Path(tmp)
        subprocess.run([str(PY), "-c", MAKE_BIG, str(t / "big.png")], check=True)
        res["png_bytes"] = (t / "big.png").stat().st_size
        (t / "gbig.txt").write_text("big.png\n" + "".join(f"{p}\n" for p in demo))
        common = ["--quiet", "--threads", "2"]
        cases = {
            "decode": ([PY, "-c", "import sys; from cbir.data import decode_image; a = decode_image(sys.argv[1], max_side=512); print(a.shape)", t / "big.png"], 0),
            "build": ([CBIR, "index", "build", "--list", "gbig.txt", "--out", "big-idx", *common], 0),
            "query": ([CBIR, "query", "--index", "big-idx", "big.png", "--json", *common], 0),
        }
        if a.two:
            os.link(t / "big.png", t / "big2.png")
            (t / "gbig2.txt").write_text("big.png\nbig2.png\n" + "".join(f"{p}\n" for p in demo))
            cases["build_two_big_as6g"] = ([CBIR, "index", "build", "--list", "gbig2.txt", "--out", "big2-idx", *common], 6 << 30)
        for name, (cmd, lim) in cases.items():
            r = measured(cmd, t, lim)
            if name.startswith("build") and r["rc"] == 0:
                m = json.loads((t / ("big-idx" if name == "build" else "big2-idx") / "manifest.json").read_text())
                r["manifest_count"] = m["count"]
                r["failures"] = m["failures"]
            if name != "decode":
                r["stdout"] = r["stdout"][-300:]
            r["stderr"] = r["stderr"][-600:]
            r["as_limit_bytes"] = lim or None
            res[name] = r
            print(f"{name}: rc {r['rc']}  peak {r['peak_rss_kib']} KiB  {r['seconds']} s", flush=True)
    doc = json.loads(OUT.read_text()) if OUT.is_file() else {}
    doc.update({
        "what": f"peak RSS (ru_maxrss of one child process, KiB) and wall seconds of a {SIDE}x{SIDE} RGBA PNG in "
                "decode_image / index build (+3 demo JPEGs, default extractor) / query",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
    })
    doc.setdefault("runs", {})[a.label] = {"created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                           "loadavg_1min_after": round(os.getloadavg()[0], 2), **res}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    sys.exit(main())
