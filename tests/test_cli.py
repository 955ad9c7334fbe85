"""The command line as a user runs it: --help everywhere, JSON for scripts, one-line errors, end to end."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cbir.cli import build_parser, main

from helpers import REPO, shared


def _subcommands(parser, prefix=()):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield prefix + (name,)
                yield from _subcommands(sub, prefix + (name,))


def test_every_command_has_help(capsys):
    cmds = list(_subcommands(build_parser()))
    assert ("index", "build") in cmds and ("query",) in cmds and ("eval",) in cmds and ("train",) in cmds
    for c in cmds:
        with pytest.raises(SystemExit) as e:
            main(list(c) + ["--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: cbir" in out


def test_eval_help_says_what_precision_at_k_is(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "what seed 003 prints as 'mAP@k'" in out


def test_python_dash_m_works():
    r = subprocess.run([sys.executable, "-m", "cbir", "--version"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.startswith("cbir ")


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["query", "--index", str(tmp_path / "none"), "x.jpg", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a cbir index" in err and "Traceback" not in err
    assert main(["index", "build", "--list", str(tmp_path / "no.txt"), "--out", str(tmp_path / "i"), "--quiet"]) == 2
    err = capsys.readouterr().err  # a path that is neither a list nor a folder (issue 21: folders are taken too)
    assert "no.txt: not found (expected a file list or a folder of images)" in err and err.count("\n") == 1


def test_build_query_eval_json(small_set, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    assert main(["index", "build", "--list", str(small_set / "list.txt"), "--extractor", "colour", "--out", idx, "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["images"] == 12 and summary["failed"] == 0
    q = str(small_set / "img" / "g1_0.jpg")
    assert main(["query", "--index", idx, q, "--top-k", "3", "--json", "--grid", str(tmp_path / "grid.png"), "--quiet"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["queries"][0]["results"][0]["name"] == "img/g1_0.jpg" and len(res["queries"][0]["results"]) == 3
    assert (tmp_path / "grid.png").stat().st_size > 1000
    out_json = tmp_path / "e.json"
    assert main(["eval", "--index", idx, "--queries", str(small_set / "list.txt"), "--json", str(out_json),
                 "--plot", str(tmp_path / "pr.png"), "--quiet"]) == 0
    rep = json.loads(out_json.read_text())
    assert set(rep) >= {"dataset", "extractor", "n_queries", "metrics", "seconds"}
    assert set(rep["metrics"]) >= {"precision@1", "precision@5", "precision@10", "ap@1", "ap@5", "ap@10", "map", "ns_score"}
    assert rep["n_queries"] == 12 and rep["extractor"] == "colour"
    assert (tmp_path / "pr.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "precision@10" in table and "ns_score" in table
    # the index refuses another extractor
    assert main(["query", "--index", idx, q, "--extractor", "pooled", "--quiet"]) == 2
    assert "built with extractor 'colour'" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_end_to_end_default_extractor(tmp_path, capsys):
    """What `make demo` runs, on the generated demo set, with the default (fused) extractor."""
    idx = str(tmp_path / "demo")
    assert main(["index", "build", "--dataset", "demo", "--out", idx, "--quiet"]) == 0
    out_json = tmp_path / "e.json"
    assert main(["eval", "--index", idx, "--dataset", "demo", "--json", str(out_json), "--quiet"]) == 0
    m = json.loads(out_json.read_text())["metrics"]
    assert m["precision@1"] >= 0.95 and m["map"] >= 0.9, m


@pytest.mark.slow
def test_corel_pooled_end_to_end(tmp_path):
    """corel1k, default pooled extractor, leave-one-out: the issue's bar is P@10 >= 0.70."""
    shared("category_wang_corel1k")
    idx = str(tmp_path / "corel")
    assert main(["index", "build", "--dataset", "corel1k", "--extractor", "pooled", "--out", idx, "--quiet"]) == 0
    out_json = tmp_path / "e.json"
    assert main(["eval", "--index", idx, "--dataset", "corel1k", "--json", str(out_json), "--quiet"]) == 0
    rep = json.loads(out_json.read_text())
    assert rep["n_queries"] == 1000 and rep["leave_one_out"]
    assert rep["metrics"]["precision@10"] >= 0.70, rep["metrics"]


# ------------------------------------------------------------------------------- bad queries, counts, escapes


def _strict_json(text):
    """json.loads that refuses NaN / Infinity (Python's json accepts them by default)."""
    def no_constant(c):
        raise ValueError(f"not strict JSON: {c}")

    return json.loads(text, parse_constant=no_constant)


def _colour_index(small_set, tmp_path, capsys, lst=None):
    idx = str(tmp_path / "idx")
    assert main(["index", "build", "--list", str(lst or small_set / "list.txt"), "--extractor", "colour", "--out", idx, "--quiet"]) == 0
    capsys.readouterr()
    return idx


def test_query_list_with_a_bad_file_answers_the_good_ones(small_set, tmp_path, capsys):
    idx = _colour_index(small_set, tmp_path, capsys)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    good = [str(small_set / "img" / "g0_0.jpg"), str(small_set / "img" / "g2_1.jpg")]
    args = ["query", "--index", idx, good[0], str(bad), good[1], "--top-k", "2", "--quiet"]
    assert main(args + ["--json", "--grid", str(tmp_path / "grid.png")]) == 0
    cap = capsys.readouterr()
    res = _strict_json(cap.out)
    assert [q["query"] for q in res["queries"]] == good
    assert res["queries"][0]["results"][0]["name"] == "img/g0_0.jpg"
    assert res["failures"] == [{"path": str(bad), "cause": "not an image (unrecognised format)", "position": 1}]
    assert f"skipped query {bad}: not an image" in cap.err
    # only the good ones are drawn, numbered by their position among the arguments
    assert (tmp_path / "grid_0.png").is_file() and (tmp_path / "grid_2.png").is_file() and not (tmp_path / "grid_1.png").exists()
    # text mode: the table of the good ones on stdout, one line per bad file on stderr
    assert main(args) == 0
    cap = capsys.readouterr()
    assert cap.out.count("query ") == 2 and "img/g2_1.jpg" in cap.out
    assert [l for l in cap.err.splitlines() if l.startswith(("skipped", "error"))] == [f"skipped query {bad}: not an image (unrecognised format)"]
    # --strict: still answered, but exit status 2
    assert main(args + ["--json", "--strict"]) == 2
    cap = capsys.readouterr()
    assert len(_strict_json(cap.out)["queries"]) == 2 and "error: --strict: 1 of 3 queries" in cap.err
    # no bad file: --strict changes nothing
    assert main(["query", "--index", idx, good[0], "--strict", "--quiet"]) == 0
    capsys.readouterr()


def test_query_all_bad_exits_2_with_one_line(small_set, tmp_path, capsys):
    idx = _colour_index(small_set, tmp_path, capsys)
    (tmp_path / "bad.jpg").write_text("not an image")
    assert main(["query", "--index", idx, str(tmp_path / "bad.jpg"), str(tmp_path / "missing.jpg"), "--json", "--quiet"]) == 2
    cap = capsys.readouterr()
    assert cap.out == ""
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: none of the 2 queries could be answered")
    assert "missing.jpg: file not found" in lines[0]
    assert main(["query", "--index", idx, str(tmp_path / "missing.jpg"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.jpg'}: file not found"


def test_reranker_query_images_collects_failures(small_set, tmp_path):
    """The re-ranking path skips an unreadable query like the global one (mnn on stored SIFT features)."""
    pytest.importorskip("cv2")
    from cbir.engine import Index, build_index
    from cbir.data import read_file_list
    from cbir.errors import CbirError
    from cbir.local.rerank import Reranker

    build_index(read_file_list(small_set / "list.txt"), tmp_path / "idx", extractor="colour", local="sift", progress=False)
    rr = Reranker(Index(tmp_path / "idx"), "mnn", conf={"min_inliers": 0})
    good = small_set / "img" / "g1_0.jpg"
    failures = []
    res = rr.query_images([tmp_path / "missing.jpg", good], top_k=3, top=5, failures=failures)
    assert [q["query"] for q in res] == [str(good)] and len(res[0]["results"]) == 3
    assert failures == [{"path": str(tmp_path / "missing.jpg"), "cause": "file not found", "position": 0}]
    with pytest.raises(CbirError, match="file not found"):  # without a failures list the first bad one raises
        rr.query_images([tmp_path / "missing.jpg", good], top_k=3, top=5)
    rr.close()


@pytest.mark.parametrize("args", [
    ["query", "--index", "i", "x.jpg", "--top-k", "0"],
    ["query", "--index", "i", "x.jpg", "--top-k", "-3"],
    ["query", "--index", "i", "x.jpg", "--top-k", "two"],
    ["query", "--index", "i", "x.jpg", "--rerank-top", "0"],
    ["query", "--index", "i", "x.jpg", "--rerank-keypoints", "0"],
    ["query", "--index", "i", "x.jpg", "--min-inliers", "-1"],
    ["query", "--index", "i", "x.jpg", "--threads", "0"],
    ["eval", "--index", "i", "--k", "5", "0"],
    ["eval", "--index", "i", "--max-rank", "0"],
    ["eval", "--index", "i", "--workers", "-1"],
    ["index", "build", "--list", "l", "--out", "o", "--batch-size", "0"],
    ["index", "build", "--list", "l", "--out", "o", "--workers", "-2"],
    ["train", "--list", "l", "--out", "o", "--epochs", "0"],
    ["train", "--list", "l", "--out", "o", "--hidden", "-1"],
    ["match", "a.jpg", "b.jpg", "--max-side", "-1"],
    ["segment", "a.jpg", "--head", "h", "--chunk", "0"],
    ["export", "onnx", "--model", "xfeat", "--out", "x.onnx", "--opset", "11"],
])
def test_counts_that_make_no_sense_are_usage_errors(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage: cbir" in err and "expected " in err


def test_zero_is_kept_where_it_means_something():
    p = build_parser()
    assert p.parse_args(["index", "build", "--list", "l", "--out", "o", "--workers", "0"]).workers == 0  # decode inline
    assert p.parse_args(["query", "--index", "i", "x.jpg", "--min-inliers", "0"]).min_inliers == 0
    assert p.parse_args(["train", "--list", "l", "--out", "o", "--hidden", "0"]).hidden == 0  # linear head
    assert p.parse_args(["eval", "--index", "i", "--k", "1", "3"]).k == [1, 3]


def test_eval_with_labels_missing_from_the_gallery(small_set, tmp_path, capsys):
    idx = _colour_index(small_set, tmp_path, capsys)
    q = tmp_path / "q.txt"
    img = small_set / "img"
    q.write_text(f"{img / 'g0_0.jpg'}\tgroup0\n{img / 'g1_1.jpg'}\tgroup1\n{img / 'g2_2.jpg'}\tnowhere\n{img / 'g2_3.jpg'}\tnowhere\n")
    out_json = tmp_path / "e.json"
    assert main(["eval", "--index", idx, "--queries", str(q), "--json", str(out_json), "--quiet"]) == 0
    cap = capsys.readouterr()
    warn = [l for l in cap.err.splitlines() if l.startswith("warning:")]
    assert len(warn) == 1 and "2 of 4 queries have no relevant image" in warn[0] and "g2_2.jpg" in warn[0] and "'nowhere'" in warn[0]
    rep = _strict_json(out_json.read_text())
    assert rep["n_queries"] == 2 and rep["n_queries_listed"] == 4 and rep["n_queries_without_relevant"] == 2
    # absolute paths under the list's folder are named relative to it (issue 24.8: no path of this machine as a name)
    assert rep["queries_without_relevant"] == [{"name": "set/img/g2_2.jpg", "label": "nowhere"},
                                               {"name": "set/img/g2_3.jpg", "label": "nowhere"}]
    assert all(v is not None and 0 <= v <= 4 for v in rep["metrics"].values())
    assert None not in rep["pr_curve"]["precision"]
    assert cap.out.splitlines()[0].startswith(f"{q}: 2 queries (2 without a relevant gallery image left out")


def test_eval_with_no_label_in_the_gallery_exits_2(small_set, tmp_path, capsys):
    idx = _colour_index(small_set, tmp_path, capsys)
    q = tmp_path / "q.txt"
    q.write_text(f"{small_set / 'img' / 'g0_0.jpg'}\tnowhere\n{small_set / 'img' / 'g1_0.jpg'}\telsewhere\n")
    out_json = tmp_path / "e.json"
    assert main(["eval", "--index", idx, "--queries", str(q), "--json", str(out_json), "--quiet"]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no query can be evaluated: none of the 2 queries")
    assert "NaN" not in cap.out + cap.err and not out_json.exists()


def test_print_eval_writes_undefined_metrics_as_a_dash(capsys):
    from cbir.cli.evaluate import print_eval

    rep = {"dataset": "d", "split": None, "n_queries": 0, "gallery_size": 3, "extractor": "colour", "metric": "cosine",
           "leave_one_out": False, "metrics": {"precision@1": None, "map": 0.5}, "seed_definition": {"seed_mAP@1": None},
           "seconds": {"extract_queries": 0, "search": 0, "search_ms_per_query": 0}}
    print_eval(rep, [1])
    out = capsys.readouterr().out
    assert "precision@1" in out and "nan" not in out.lower() and "0.5000" in out


def test_tty_safe_escapes_control_characters():
    from cbir.cli import tty_safe

    assert tty_safe("\x1b[31mred") == "\\x1b[31mred"
    assert tty_safe("\x1b]0;title\x07") == "\\x1b]0;title\\x07"
    assert tty_safe("a\nb\tc\x9b\u202e") == "a\\nb\\tc\\x9b\\u202e"
    assert tty_safe("plain ümlaut/日本 C:\\x") == "plain ümlaut/日本 C:\\x"
    assert tty_safe(None) == "None"


def test_labels_with_escape_codes_print_escaped(small_set, tmp_path, capsys):
    lst = small_set / "esc.txt"
    lines = (small_set / "list.txt").read_text().splitlines()
    lst.write_text("\n".join(l.replace("group0", "\x1b[31mred").replace("group1", "\x1b]0;title\x07") for l in lines) + "\n")
    idx = _colour_index(small_set, tmp_path, capsys, lst=lst)
    q = [str(small_set / "img" / "g0_0.jpg"), str(small_set / "img" / "g1_0.jpg")]
    assert main(["query", "--index", idx, *q, "--top-k", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[31mred" in out and "\\x1b]0;title\\x07" in out
    # JSON stays exact
    assert main(["query", "--index", idx, q[0], "--top-k", "1", "--json", "--quiet"]) == 0
    assert _strict_json(capsys.readouterr().out)["queries"][0]["results"][0]["label"] == "\x1b[31mred"
    # eval's warning and header, index info: escaped too
    qf = tmp_path / "q.txt"
    qf.write_text(f"{q[0]}\t\x1b[31mred\n{q[1]}\t\x1b[32mgreen\n")
    assert main(["eval", "--index", idx, "--queries", str(qf), "--quiet"]) == 0
    cap = capsys.readouterr()
    assert "\x1b" not in cap.out + cap.err and "\\x1b[32mgreen" in cap.err
    assert main(["index", "info", idx]) == 0
    assert "\x1b" not in capsys.readouterr().out
