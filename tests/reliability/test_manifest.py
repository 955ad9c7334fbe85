"""Issue 24.3: manifest.json is integrity-checked: its own checksum, and the extractor key against its conf."""

import json

import pytest

from cbir.data import read_file_list
from cbir.engine import Index, build_index, verify_index
from cbir.errors import IndexDamaged
from cbir.index import manifest


@pytest.fixture
def built(small_set, tmp_path):
    build_index(read_file_list(small_set / "list.txt"), tmp_path / "idx", extractor="colour", progress=False, workers=0)
    return tmp_path / "idx"


def test_a_fresh_manifest_records_its_checksum_and_verifies(built):
    m = json.loads((built / manifest.MANIFEST).read_text())
    assert m[manifest.MANIFEST_SUM] == manifest.manifest_digest(m) and verify_index(built)["ok"]


@pytest.mark.parametrize("old,new", [('"max_side": 256', '"max_side": 255'), ("16,", "15,")])
def test_a_one_byte_edit_of_the_extractor_conf_is_damage(built, old, new):
    p = built / manifest.MANIFEST
    text = p.read_text()
    assert old in text
    p.write_text(text.replace(old, new, 1))
    with pytest.raises(IndexDamaged, match=r"manifest.json: damaged \(checksum mismatch"):
        verify_index(built)
    with pytest.raises(IndexDamaged, match="manifest.json: damaged"):
        Index(built)


def test_an_edit_with_the_checksum_dropped_is_caught_by_the_extractor_key(built):
    p = built / manifest.MANIFEST
    m = json.loads(p.read_text())
    del m[manifest.MANIFEST_SUM]  # as an index of an older cbir would read: accepted only while its keys match its conf
    m["extractor"]["conf"]["bins"] = list(reversed(m["extractor"]["conf"]["bins"]))
    p.write_text(json.dumps(m))
    with pytest.raises(IndexDamaged, match=r"manifest.json: damaged \(extractor key .* does not match its recorded conf"):
        verify_index(built)


def test_the_cli_verify_fails_with_one_line(built, capsys):
    from cbir.cli import main

    p = built / manifest.MANIFEST
    p.write_text(p.read_text().replace('"max_side": 256', '"max_side": 255', 1))
    assert main(["index", "verify", str(built)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "manifest.json: damaged" in err[0]
