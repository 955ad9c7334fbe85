"""datasets.yaml: named datasets (gallery, queries, label names), their splits and generated sets."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from ..errors import CbirError
from .lists import Entry, natural_key, read_file_list

PathLike = Union[str, os.PathLike]


@dataclass
class Dataset:
    """A named dataset of datasets.yaml: gallery entries and, when the dataset has them, separate queries."""

    name: str
    gallery: List[Entry]
    queries: Optional[List[Entry]] = None  # None: every gallery image queries the rest (leave-one-out)
    label_names: Optional[Dict[str, str]] = None
    split: Optional[str] = None


def find_datasets_yaml(explicit: Optional[PathLike] = None) -> Path:
    """datasets.yaml: ``explicit``, else ``$CBIR_DATASETS``, else ``./datasets.yaml``, else the checkout's own."""
    candidates = [explicit, os.environ.get("CBIR_DATASETS"), "datasets.yaml", Path(__file__).resolve().parents[2] / "datasets.yaml"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c).resolve()
    if explicit:
        raise CbirError(f"{explicit}: datasets file not found")
    raise CbirError("no datasets.yaml found (looked at $CBIR_DATASETS, ./datasets.yaml and the cbir checkout); pass --datasets FILE")


def load_datasets_yaml(path: Optional[PathLike] = None) -> Tuple[Path, Dict[str, dict]]:
    import yaml

    p = find_datasets_yaml(path)
    with open(p, encoding="utf-8") as f:
        spec = yaml.safe_load(f) or {}
    if not isinstance(spec, dict):
        raise CbirError(f"{p}: expected a mapping of dataset names")
    return p, spec


def load_dataset(name: str, split: Optional[str] = None, datasets_yaml: Optional[PathLike] = None) -> Dataset:
    """Load dataset ``name`` from datasets.yaml; paths in the yaml are relative to the yaml file."""
    yaml_path, spec = load_datasets_yaml(datasets_yaml)
    if name not in spec:
        raise CbirError(f"unknown dataset {name!r} in {yaml_path}; known: {', '.join(spec)}")
    d = spec[name] or {}
    root = (yaml_path.parent / d.get("root", ".")).resolve()
    if d.get("generate") and not (root / d.get("list", "list.txt")).is_file():
        _generate(d["generate"], root)
    if not root.is_dir():
        raise CbirError(
            f"dataset {name!r}: folder {root} not found. {d.get('missing_hint', 'Fetch the data there or edit ' + str(yaml_path) + '.')}"
        )
    gallery = _entries_of(d.get("list", d.get("gallery")), root, d.get("label_column"), name)
    queries = _entries_of(d["queries"], root, d.get("label_column"), name) if d.get("queries") else None
    if split is not None:
        splits = d.get("splits") or {}
        if split not in splits:
            raise CbirError(f"dataset {name!r} has no split {split!r}; splits: {', '.join(splits) or 'none'}")
        gallery = apply_split(gallery, splits[split])
    names = d.get("label_names")
    names = {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None
    return Dataset(name=name, gallery=gallery, queries=queries, label_names=names, split=split)


def _entries_of(spec, root: Path, label_column: Optional[str], name: str) -> List[Entry]:
    if spec is None:
        raise CbirError(f"dataset {name!r}: no 'list' given in datasets.yaml")
    if isinstance(spec, list):
        entries = []
        for item in spec:
            if isinstance(item, dict):
                entries.append(Entry(str(item["path"]), root / str(item["path"]), _label(item.get("label"))))
            else:
                entries.append(Entry(str(item), root / str(item), None))
        return entries
    return read_file_list(root / spec, root=root, label_column=label_column)


def _label(v) -> Optional[str]:
    return None if v is None else str(v)


def apply_split(entries: List[Entry], rule: dict) -> List[Entry]:
    """Split rules: ``{per_label: first_half|second_half}`` (by natural file-name order) or ``{list: FILE}``."""
    per_label = rule.get("per_label")
    if per_label not in ("first_half", "second_half"):
        raise CbirError(f"unsupported split rule {rule!r}")
    groups: Dict[Optional[str], List[Entry]] = {}
    for e in entries:
        groups.setdefault(e.label, []).append(e)
    keep = set()
    for members in groups.values():
        members = sorted(members, key=lambda e: natural_key(e.name))
        half = len(members) // 2
        keep.update(e.name for e in (members[:half] if per_label == "first_half" else members[half:]))
    return [e for e in entries if e.name in keep]


def _generate(kind: str, root: Path) -> None:
    if kind != "demo":
        raise CbirError(f"unknown dataset generator {kind!r}")
    from ..demo import make_demo_dataset

    make_demo_dataset(root)
