"""File lists, datasets.yaml and robust decoding: every bad-input kind gets a named, specific error."""

import io
import json
import threading
import warnings
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
import cbir.data as data
import cbir.data.decode as decode  # the decoding module: its limits, byte budget and helpers
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


# ---------------------------------------------------------------- decoding: memory bounded by the working size

BIG = 9400  # the reported image: 9400x9400 RGBA (88 M pixels, ~353 MB decoded), a PNG of ~470 KB


def _big_rgba() -> np.ndarray:
    a = np.zeros((BIG, BIG, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = 128
    a[::7, ::5, 1] = 90
    return a


def _composite(a: np.ndarray) -> np.ndarray:
    """The simple reference: RGBA composited on white in float64, at full size."""
    alpha = a[..., 3:4].astype(np.float64) / 255.0
    return a[..., :3] * alpha + 255.0 * (1.0 - alpha)


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    h, w = x.shape[0] // f * f, x.shape[1] // f * f
    return x[:h, :w].reshape(h // f, f, w // f, f, -1).mean(axis=(1, 3))


@pytest.fixture()
def limits():
    """Restore cbir's process-wide limits (and PIL's) after a test changes them."""
    before = data.set_limits()
    yield data
    data.set_limits(**before)


@pytest.fixture(scope="module")
def big_png(tmp_path_factory):
    p = tmp_path_factory.mktemp("big") / "big.png"
    Image.fromarray(_big_rgba(), "RGBA").save(p)
    return p


def test_huge_rgba_png_decodes_to_the_working_size_with_its_colours(big_png):
    out = decode_image(big_png, max_side=512)
    assert out.shape == (512, 512, 3) and out.dtype == np.uint8
    # reference on a crop of one period of the pattern (35 = 7 x 5) times the reduction factor (9400 // 512 = 18)
    f = BIG // 512
    ref = _composite(_big_rgba()[: 35 * f, : 35 * f])
    blocks = _block_mean(ref, f)  # what one output pixel averages before the last, sub-2x area resize
    # each output value went through 3 roundings (premultiplied colour, box reduction, area resize): <= 0.5 each
    tol = 1.5
    for c in range(3):
        assert blocks[..., c].min() - tol <= out[..., c].min() and out[..., c].max() <= blocks[..., c].max() + tol, c
        assert abs(out[..., c].mean() - ref[..., c].mean()) <= tol, c
    assert (out[..., 0] == 227).all() and (out[..., 2] == 127).all()  # 200 / 0 over white at alpha 128/255


def test_huge_png_takes_one_decode_buffer_counted_in_the_budget(big_png, monkeypatch):
    held = []
    real = decode._DECODE_BUDGET.hold

    def hold(nbytes, limit):
        held.append((nbytes, limit))
        return real(nbytes, limit)

    monkeypatch.setattr(decode._DECODE_BUDGET, "hold", hold)
    decode_image(big_png, max_side=512)
    assert held == [(BIG * BIG * 4, decode.MAX_PIXELS * 4)]
    assert decode._DECODE_BUDGET.used == 0


def test_jpeg_is_decoded_at_a_reduced_scale(tmp_path, monkeypatch):
    Image.fromarray(_rgb(3000, 4000)).save(tmp_path / "photo.jpg", quality=80)
    held = []
    real = decode._DECODE_BUDGET.hold
    monkeypatch.setattr(decode._DECODE_BUDGET, "hold", lambda n, lim: held.append(n) or real(n, lim))
    assert decode_image(tmp_path / "photo.jpg", max_side=500).shape == (375, 500, 3)
    assert held == [500 * 375 * 4]  # draft mode: 1/8 scale, never the 4000x3000 buffer


def test_alpha_reduced_equals_full_size_composite_averaged(tmp_path):
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (12, 18, 4), dtype=np.uint8)
    tiles[0, 0] = (0, 0, 0, 0)  # fully transparent black: must come out white, not grey
    tiles[0, 1, 3] = 255
    a = np.repeat(np.repeat(tiles, 100, axis=0), 100, axis=1)  # 1200 x 1800, tiles of 100 px
    Image.fromarray(a, "RGBA").save(tmp_path / "tiles.png")
    out = decode_image(tmp_path / "tiles.png", max_side=150).astype(float)  # factor 12, no resize after
    ref = _block_mean(_composite(a), 12)
    assert out.shape == ref.shape == (100, 150, 3)
    # roundings: premultiplied colour, its box mean, the alpha's box mean: <= 0.5 each
    np.testing.assert_allclose(out, ref, atol=1.5)
    assert (out[:8, :8] == 255).all()
    # full size (no max_side): exactly the former float formula, rounded once
    full = decode_image(tmp_path / "tiles.png").astype(float)
    np.testing.assert_allclose(full, _composite(a), atol=0.5 + 1e-9)


def test_other_modes_reduced_match_their_full_size_conversion(tmp_path):
    h, w = 640, 960
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.dstack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)]).astype(np.uint8)
    alpha = (x * 255 // w).astype(np.uint8)
    cases = {
        "l.png": Image.fromarray(rgb).convert("L"),
        "la.png": Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"),
        "p.png": Image.fromarray(rgb).convert("P"),
        "1.png": Image.fromarray(rgb).convert("1"),
        "g16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257),
        "f.tif": Image.fromarray(rgb[..., 1].astype(np.float32) / 255.0),
        "rgb.tif": Image.fromarray(rgb),
        "cmyk.tif": Image.fromarray(rgb).convert("CMYK"),
    }
    pt = Image.fromarray(rgb).convert("P")
    pt.info["transparency"] = int(np.asarray(pt)[0, 0])
    cases["ptrans.png"] = pt
    for name, im in cases.items():
        kw = {"transparency": pt.info["transparency"]} if name == "ptrans.png" else {}
        im.save(tmp_path / name, **kw)
        small = decode_image(tmp_path / name, max_side=120).astype(float)  # factor 8: 120 x 80, no resize after
        full = decode_image(tmp_path / name).astype(float)
        assert small.shape == (80, 120, 3), name
        # the box mean of the full-size conversion; roundings <= 0.5 per step (colour/alpha, then mean)
        np.testing.assert_allclose(small, _block_mean(full, 8), atol=1.5, err_msg=name)


# ---------------------------------------------------------------- decoding: cbir's own cap, --max-pixels


def test_pixel_cap_messages_name_cbirs_limit_and_pil_agrees(tmp_path, limits):
    from PIL import Image as PILImage

    limits.set_limits(max_pixels=1_000_000)
    assert PILImage.MAX_IMAGE_PIXELS == 1_000_000  # PIL warns above the same number, raises above twice it
    Image.new("L", (1200, 1000)).save(tmp_path / "over.png")  # 1.2 M: PIL would only warn
    Image.new("L", (3000, 3000)).save(tmp_path / "bomb.png")  # 9 M: PIL raises with its own 2 M
    for filt in ("always", "error"):  # whatever the warning filters (pytest -W error included)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter(filt)
            for name in ("over.png", "bomb.png"):
                with pytest.raises(DecodeError) as ei:
                    decode_image(tmp_path / name)
                msg = str(ei.value)
                assert name in msg and "limit of 1,000,000 pixels" in msg and "--max-pixels" in msg, msg
                assert "2000000" not in msg and "178956970" not in msg and "89478485" not in msg, msg
        # shown only when a caller asks for every warning, and then with cbir's number too
        assert all("limit of 1000000 pixels" in str(w.message) for w in rec)
    Image.new("L", (1000, 1000)).save(tmp_path / "at.png")
    assert decode_image(tmp_path / "at.png").shape == (1000, 1000, 3)  # at the limit: accepted
    limits.set_limits(max_pixels=data.DEFAULT_MAX_PIXELS)
    assert decode_image(tmp_path / "bomb.png").shape == (3000, 3000, 3)
    with pytest.raises(CbirError, match="positive"):
        limits.set_limits(max_pixels=0)


def test_max_pixels_flag_in_build_and_query(tmp_path, capsys):
    from cbir.cli import main

    for i in range(3):
        Image.fromarray(_rgb(60, 80, seed=i)).save(tmp_path / f"s{i}.png")
    Image.fromarray(_rgb(1000, 1500, seed=9)).save(tmp_path / "large.png")  # 1.5 M pixels
    (tmp_path / "list.txt").write_text("s0.png\ns1.png\ns2.png\nlarge.png\n")
    idx = tmp_path / "idx"
    rc = main(["index", "build", "--list", str(tmp_path / "list.txt"), "--out", str(idx), "--extractor", "colour", "--quiet",
               "--max-pixels", "1000000", "--json"])
    assert rc == 0
    m = json.loads((idx / "manifest.json").read_text())
    assert m["count"] == 3 and [f["name"] for f in m["failures"]] == ["large.png"]
    assert "limit of 1,000,000 pixels" in m["failures"][0]["cause"]
    assert decode.MAX_PIXELS == data.DEFAULT_MAX_PIXELS  # main() leaves the process limit as it was
    capsys.readouterr()
    rc = main(["query", "--index", str(idx), str(tmp_path / "large.png"), "--max-pixels", "1000000", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and str(tmp_path / "large.png") in err and "limit of 1,000,000 pixels" in err, err
    assert main(["query", "--index", str(idx), str(tmp_path / "large.png"), "--quiet", "--json"]) == 0  # default cap: fine


# ---------------------------------------------------------------- decoding: out of memory is one image's failure


def test_memory_error_decoding_one_image_fails_that_image_only(tmp_path, monkeypatch):
    from cbir.engine import build_index

    entries = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        Image.fromarray(_rgb(50, 70 + i, seed=i)).save(p)
        entries.append(Entry(p.name, p, None))
    real = decode._reduced_rgb8

    def reduced(im, factor):
        if im.size[0] == 72:
            np.empty((1 << 40,), np.uint8)  # numpy's own _ArrayMemoryError, as in the report
        return real(im, factor)

    monkeypatch.setattr(decode, "_reduced_rgb8", reduced)
    with pytest.raises(DecodeError, match=r"out of memory decoding this 72x50 image"):
        decode_image(entries[2].path)
    rep = build_index(entries, tmp_path / "idx", extractor="colour", progress=False)
    assert rep.count == 4 and [f["name"] for f in rep.failures] == ["2.png"]
    assert "out of memory" in rep.failures[0]["cause"] and "72x50" in rep.failures[0]["cause"]
    assert decode._DECODE_BUDGET.used == 0  # the failed image gave its budget back


def test_memory_error_outside_decode_image_and_in_extraction_stay_per_image(tmp_path, monkeypatch):
    from cbir.engine import build_index
    from cbir.extractors.colour import ColourExtractor

    entries = []
    for i in range(4):
        p = tmp_path / f"{i}.png"
        Image.fromarray(_rgb(50, 70 + i, seed=i)).save(p)
        entries.append(Entry(p.name, p, None))
    real_decode = decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda p, **kw: (_ for _ in ()).throw(MemoryError()) if str(p).endswith("1.png")
                        else real_decode(p, **kw))
    got = list(iter_decoded(entries, max_side=64, workers=2))
    assert isinstance(got[1][2], DecodeError) and "out of memory" in got[1][2].cause
    assert all(isinstance(g[2], np.ndarray) for j, g in enumerate(got) if j != 1)
    monkeypatch.setattr(decode, "decode_image", real_decode)
    # a MemoryError in the network batch: the engine retries one by one and names the image
    real_extract = ColourExtractor.extract

    def extract(self, images):
        if any(im.shape[1] == 73 for im in images):
            raise MemoryError("Unable to allocate 9.9 GiB")
        return real_extract(self, images)

    monkeypatch.setattr(ColourExtractor, "extract", extract)
    rep = build_index(entries, tmp_path / "idx", extractor="colour", progress=False)
    assert rep.count == 3 and [f["name"] for f in rep.failures] == ["3.png"]
    assert "Unable to allocate" in rep.failures[0]["cause"]


def test_decode_budget_runs_big_buffers_one_at_a_time():
    budget = decode._ByteBudget()
    peak = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def work(n):
        start.wait()
        for _ in range(20):
            with budget.hold(n, 100):
                with lock:
                    peak.append(budget.used)

    threads = [threading.Thread(target=work, args=(n,)) for n in (80, 80, 10, 150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    # never two big ones together; the one over the limit alone is let through alone
    assert max(u for u in peak if u != 150) <= 100 and budget.used == 0



def test_shape_batches_one_shape_per_batch_bounded_wait_every_image_once():
    shapes = [(4, 6, 3), (6, 4, 3), (5, 5, 3)]
    items = [(i, Entry(name=f"n{i}", path=Path(f"n{i}")),
              DecodeError(f"n{i}", "corrupt image data") if i % 13 == 5 else np.zeros(shapes[(i * 7) % 3], np.uint8))
             for i in range(40)]
    consumed = [0]

    def source():
        for it in items:
            consumed[0] += not isinstance(it[2], DecodeError)
            yield it

    seen, batches = [], []
    for kind, item in data.shape_batches(source(), 4, max_waiting=5):
        if kind == "error":
            assert isinstance(item[2], DecodeError)
            seen.append(item[0])
            continue
        assert 1 <= len(item) <= 4 and len({img.shape for _, _, img in item}) == 1
        batches.append(item)
        seen += [i for i, _, _ in item]
        waiting = consumed[0] - sum(len(b) for b in batches)
        assert waiting <= 5  # never more than max_waiting images held back
    assert sorted(seen) == list(range(40))
    # with the default wait (4 batches) three interleaved shapes all fill up: one partial batch per shape at most, last
    full = [item for kind, item in data.shape_batches(iter(items), 4) if kind == "batch"]
    assert sum(len(b) < 4 for b in full) <= 3 and all(len(b) == 4 for b in full[:-3])
