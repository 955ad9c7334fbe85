"""GET /duplicates: the gallery's groups of copies, paged, with image and thumbnail URLs; nothing changed."""


def test_duplicates_pages_groups_of_the_gallery(client, gallery):
    before = sorted(p.name for p in (gallery[0] / "photos" / "img").iterdir())
    r = client.get("/duplicates", params={"threshold": 0.9, "verify": False, "keep": "first", "limit": 2})
    assert r.status_code == 200, r.text
    d = r.json()
    assert d["n_groups"] >= 3 and len(d["groups"]) == 2 and d["offset"] == 0 and d["verify"] is False
    g = d["groups"][0]
    assert g["keep"] == g["images"][0] == sorted(g["images"])[0]
    assert len({n.split("_")[0] for n in g["images"]}) == 1  # one photo's variants, not a mix
    f = g["files"][0]
    assert f["thumb"].startswith("/thumbs/img/") and "path" not in f
    assert client.get(f["thumb"]).status_code == 200
    rest = client.get("/duplicates", params={"threshold": 0.9, "verify": False, "keep": "first", "offset": 2, "limit": 500}).json()
    assert len(rest["groups"]) == d["n_groups"] - 2
    assert sorted(p.name for p in (gallery[0] / "photos" / "img").iterdir()) == before


def test_duplicates_refuses_bad_options(client):
    assert client.get("/duplicates", params={"keep": "newest"}).status_code == 422
    r = client.get("/duplicates")  # colour has no measured threshold: a clear 400, not a crash
    assert r.status_code == 400 and "--threshold" in r.json()["error"]


def test_a_search_answer_names_the_image_its_upload_duplicates(client, monkeypatch):
    import cbir.duplicates
    from serve.support import query_bytes

    files = {"image": ("q.jpg", query_bytes(1, "crop"), "image/jpeg")}
    plain = client.post("/search", files=files, params={"top_k": 3}).json()
    assert "duplicate_of" not in plain  # colour has no measured threshold
    monkeypatch.setitem(cbir.duplicates.THRESHOLDS, "colour", 0.5)
    d = client.post("/search", files=files, params={"top_k": 3}).json()
    assert d["duplicate_of"]["name"] == d["results"][0]["name"] and d["duplicate_of"]["score"] >= 0.5
    monkeypatch.setitem(cbir.duplicates.THRESHOLDS, "colour", 1.01)
    assert "duplicate_of" not in client.post("/search", files=files, params={"top_k": 3}).json()
