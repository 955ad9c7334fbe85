"""``cbir datasets``: the named datasets and whether their files are here."""

from __future__ import annotations

import json

from ..cliutil import tty_safe
from ..errors import CbirError

from .common import add_common


def cmd_datasets(a) -> int:
    from ..data import load_dataset, load_datasets_yaml

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


def register(sub, add_common=None) -> None:
    """Add this module's sub-command(s) to the main parser."""
    d = sub.add_parser("datasets", help="list the datasets of datasets.yaml", description="List named datasets and whether their files are here.")
    d.add_argument("--check", action="store_true", help="read each dataset's list (and generate the demo set if missing)")
    d.add_argument("--json", action="store_true")
    add_common(d)
    d.set_defaults(func=cmd_datasets)
