"""File lists, datasets.yaml and robust decoding: every bad-input kind gets a named, specific error."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir.data import (
    Entry,
    apply_split,
    decode_image,
    iter_decoded,
    load_dataset,
    natural_key,
    read_file_list,
)
from cbir.errors import CbirError, DecodeError


def _rgb(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- file lists


def test_seed_format_tabs_whitespace_comments(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("# a comment\nimg/a.jpg\t3\n\nimg/b c.jpg\t4\nimg/d.jpg 5\nimg/e.jpg\n")
    es = read_file_list(f)
    assert [e.name for e in es] == ["img/a.jpg", "img/b c.jpg", "img/d.jpg", "img/e.jpg"]
    assert [e.label for e in es] == ["3", "4", "5", None]
    assert es[0].path == tmp_path / "img/a.jpg"


def test_root_overrides_list_folder(tmp_path):
    f = tmp_path / "list.txt"
    f.write_text("a.jpg\t1\n")
    assert read_file_list(f, root="/data")[0].path == Path("/data/a.jpg")


def test_csv_with_header_prefers_label_column(tmp_path):
    f = tmp_path / "labels.csv"
    f.write_text("path,label_id,label\nimages/0.jpg,0,africa\nimages/1.jpg,1,beach\n")
    es = read_file_list(f)
    assert [(e.name, e.label) for e in es] == [("images/0.jpg", "africa"), ("images/1.jpg", "beach")]
    es = read_file_list(f, label_column="label_id")
    assert [e.label for e in es] == ["0", "1"]
    with pytest.raises(CbirError, match="no column 'nope'"):
        read_file_list(f, label_column="nope")


def test_missing_and_empty_lists_raise(tmp_path):
    with pytest.raises(CbirError, match="file list not found"):
        read_file_list(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(CbirError, match="holds no image"):
        read_file_list(tmp_path / "empty.txt")


def test_natural_order_split():
    es = [Entry(f"{i}.jpg", Path(f"{i}.jpg"), str(i // 10)) for i in range(20)]
    train = apply_split(es, {"per_label": "first_half"})
    test = apply_split(es, {"per_label": "second_half"})
    assert [e.name for e in train] == [f"{i}.jpg" for i in (0, 1, 2, 3, 4, 10, 11, 12, 13, 14)]
    assert not {e.name for e in train} & {e.name for e in test}
    assert natural_key("img2.jpg") < natural_key("img10.jpg")


def test_dataset_yaml_relative_paths_and_missing_hint(tmp_path):
    (tmp_path / "d").mkdir()
    Image.fromarray(_rgb()).save(tmp_path / "d" / "a.png")
    (tmp_path / "d" / "list.txt").write_text("a.png\tx\n")
    y = tmp_path / "datasets.yaml"
    y.write_text("mine:\n  root: d\n  list: list.txt\ngone:\n  root: nowhere\n  list: l.txt\n  missing_hint: get it from X.\n")
    ds = load_dataset("mine", datasets_yaml=y)
    assert ds.gallery[0].path == tmp_path / "d" / "a.png" and ds.queries is None
    with pytest.raises(CbirError, match="get it from X"):
        load_dataset("gone", datasets_yaml=y)
    with pytest.raises(CbirError, match="unknown dataset 'other'"):
        load_dataset("other", datasets_yaml=y)
    with pytest.raises(CbirError, match="no split 'train'"):
        load_dataset("mine", split="train", datasets_yaml=y)


# ---------------------------------------------------------------- decoding: formats


def test_grey_alpha_palette_cmyk_16bit_become_rgb8(tmp_path):
    rgb = _rgb()
    cases = {
        "grey.png": Image.fromarray(rgb).convert("L"),
        "la.png": Image.fromarray(rgb).convert("LA"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])),
        "pal.png": Image.fromarray(rgb).convert("P"),
        "cmyk.jpg": Image.fromarray(rgb).convert("CMYK"),
        "g16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "rgb.tif": Image.fromarray(rgb),
    }
    for name, im in cases.items():
        im.save(tmp_path / name)
        out = decode_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (40, 60, 3), name
    g16 = decode_image(tmp_path / "g16.png")
    np.testing.assert_array_equal(g16[..., 0], rgb[..., 0])  # 16-bit scaled back to the 8-bit values
    rgba = decode_image(tmp_path / "rgba.png").astype(int)
    # composited on white with alpha 128/255
    np.testing.assert_allclose(rgba, rgb * (128 / 255) + 255 * (1 - 128 / 255), atol=1.01)


def test_exif_orientation_is_applied(tmp_path):
    rgb = _rgb(30, 50)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "o.jpg", exif=exif, quality=95)
    out = decode_image(tmp_path / "o.jpg")
    assert out.shape[:2] == (50, 30)


def test_max_side_shrinks_and_never_enlarges(tmp_path):
    Image.fromarray(_rgb(400, 1000)).save(tmp_path / "big.jpg")
    assert decode_image(tmp_path / "big.jpg", max_side=250).shape[:2] == (100, 250)
    assert decode_image(tmp_path / "big.jpg", max_side=5000).shape[:2] == (400, 1000)


# ---------------------------------------------------------------- decoding: bad input


def test_each_bad_input_kind_is_named(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_rgb(200, 200)).save(good, quality=90)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:600])
    (tmp_path / "dir.jpg").mkdir()
    expect = {
        "missing.jpg": "file not found",
        "empty.jpg": "empty file",
        "text.jpg": "not an image",
        "trunc.jpg": "truncated",
        "dir.jpg": "folder",
    }
    for name, cause in expect.items():
        with pytest.raises(DecodeError) as ei:
            decode_image(tmp_path / name)
        assert cause in ei.value.cause, (name, ei.value.cause)
        assert name in str(ei.value)


def test_decompression_bomb_and_size_limits(tmp_path):
    Image.new("L", (3000, 3000)).save(tmp_path / "huge.png")
    with pytest.raises(DecodeError, match="too large"):
        decode_image(tmp_path / "huge.png", max_pixels=1_000_000)
    with pytest.raises(DecodeError, match="file too large"):
        decode_image(tmp_path / "huge.png", max_bytes=100)


def test_iter_decoded_keeps_order_and_reports_errors(tmp_path):
    entries = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        if i != 3:
            Image.fromarray(_rgb(20 + i, 30)).save(p)
        entries.append(Entry(p.name, p, None))
    got = list(iter_decoded(entries, workers=2, prefetch=2))
    assert [i for i, _, _ in got] == list(range(7))
    assert isinstance(got[3][2], DecodeError)
    assert all(g[2].shape[0] == 20 + g[0] for g in got if g[0] != 3)
