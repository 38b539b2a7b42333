"""Loaders for the paper's public benchmarks, on small files written here in the original formats:
AG News CSVs and Reuters-21578 SGML (reut2-*.sgm). The real files are the user's; nothing is downloaded."""

import csv
import json

import pandas as pd
import pytest

from fusion import cli
from fusion.benchmarks import prepare, read_ag_news_csv, read_reuters_sgml, reuters_splits
from fusion.errors import DataError

AG_WORDS = {1: "minister election", 2: "match goal", 3: "shares profit", 4: "software chip"}


def write_ag_news(path, per_class: int, start: int = 0) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for i in range(start, start + per_class):
            for k, words in AG_WORDS.items():
                w.writerow([k, f"Story {i}: {words}", f"It #39;s a {words} story, with commas\\and a break {i}."])


def test_ag_news_paper_split_is_balanced_disjoint_and_clean(tmp_path, capsys):
    src = tmp_path / "ag"
    src.mkdir()
    write_ag_news(src / "train.csv", 1130)
    write_ag_news(src / "test.csv", 130, start=10_000)
    assert cli.main(["prepare", "ag-news", "--source", str(src), "--output", str(tmp_path / "out")]) == 0
    parts = {s: pd.read_json(tmp_path / "out" / f"{s}.jsonl", lines=True) for s in ("train", "val", "test")}
    assert {s: len(df) for s, df in parts.items()} == {"train": 4000, "val": 500, "test": 500}
    for df, n in ((parts["train"], 1000), (parts["val"], 125), (parts["test"], 125)):
        assert df["label"].value_counts().to_dict() == {c: n for c in ("World", "Sports", "Business", "Sci/Tech")}
    assert not set(parts["train"]["id"]) & set(parts["val"]["id"])
    assert all(i.startswith("test-") for i in parts["test"]["id"])
    text = parts["train"]["text"].iloc[0]
    assert "It's a" in text and "#39;" not in text and "\\" not in text and text.startswith("Story ")
    assert "4000 rows" in capsys.readouterr().out

    # the same seed gives the same split; another seed another one
    again = prepare("ag-news", src, tmp_path / "again")
    assert pd.read_json(again["val"], lines=True)["id"].tolist() == parts["val"]["id"].tolist()
    other = prepare("ag-news", src, tmp_path / "other", seed=7)
    assert pd.read_json(other["val"], lines=True)["id"].tolist() != parts["val"]["id"].tolist()


def test_ag_news_errors_say_what_is_wrong(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text('"5","title","text"\n')
    with pytest.raises(DataError, match=r"bad.csv:1: class index 5 outside 1..4"):
        read_ag_news_csv(bad)
    src = tmp_path / "small"
    src.mkdir()
    write_ag_news(src / "train.csv", 10)
    write_ag_news(src / "test.csv", 10)
    assert cli.main(["prepare", "ag-news", "--source", str(src), "--output", str(tmp_path / "o")]) == 2
    assert "1125 rows per class needed" in capsys.readouterr().err
    assert cli.main(["prepare", "ag-news", "--source", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 2


def _doc(newid, topics, split, title, body, has_topics="YES", unproc=False):
    d = "".join(f"<D>{t}</D>" for t in topics)
    text = (
        f"&#2;{title} {body}&#3;"
        if unproc
        else f"&#2;<TITLE>{title}</TITLE><DATELINE>NEW YORK, March 3 - </DATELINE><BODY>{body}\n Reuter\n&#3;</BODY>"
    )
    kind = ' TYPE="UNPROC"' if unproc else ""
    return (
        f'<REUTERS TOPICS="{has_topics}" LEWISSPLIT="{split}" CGISPLIT="TRAINING-SET" OLDID="{newid + 5000}" '
        f'NEWID="{newid}">\n<DATE>26-FEB-1987 15:01:01.79</DATE>\n<TOPICS>{d}</TOPICS>\n<PLACES><D>usa</D></PLACES>\n'
        f"<PEOPLE></PEOPLE>\n<ORGS></ORGS>\n<EXCHANGES></EXCHANGES>\n<COMPANIES></COMPANIES>\n<UNKNOWN>&#5;&#5;</UNKNOWN>\n"
        f"<TEXT{kind}>{text}</TEXT>\n</REUTERS>\n"
    )


def write_reuters(src) -> dict:
    """Twelve topics t00..t11 (t00 most frequent); what the ModApte top-10 selection must keep."""
    src.mkdir()
    docs, newid, expect = [], 0, {"TRAIN": [], "TEST": []}
    for split, n in (("TRAIN", 60), ("TEST", 20)):
        for i in range(n):
            newid += 1
            topics = [f"t{i % (i // 5 + 1) % 12:02d}"] + (["t00"] if i % 7 == 0 else [])
            if i % 13 == 0:
                topics = ["t11"]  # a rare topic only: dropped
            docs.append(_doc(newid, topics, split, f"Headline &lt;{newid}&gt;", f"Body of story {newid}."))
            expect[split].append((newid, topics))
    newid += 1  # a TEST document without TOPICS="YES", one NOT-USED, and an unprocessed text
    docs.append(_doc(newid, ["t00"], "TEST", "no", "no", has_topics="NO"))
    docs.append(_doc(newid + 1, ["t00"], "NOT-USED", "unused", "unused"))
    docs.append(_doc(newid + 2, ["t00", "t01"], "TRAIN", "UNPROC story", "all in one", unproc=True))
    expect["TRAIN"].append((newid + 2, ["t00", "t01"]))
    head = '<!DOCTYPE lewis SYSTEM "lewis.dtd">\n'
    for j in range(3):  # spread over files like the original (1,000 documents each); one stray 8-bit byte
        chunk = head + "".join(docs[j::3])
        (src / f"reut2-{j:03d}.sgm").write_bytes(chunk.encode("latin-1") + b"\xfc\n")
    return expect


def test_reuters_modapte_top10_multilabel_split(tmp_path):
    expect = write_reuters(tmp_path / "reuters")
    docs = read_reuters_sgml(tmp_path / "reuters")
    assert len(docs) == 80 + 3
    row = docs.set_index("id").loc[5]
    assert row["text"] == "Headline <5>. Body of story 5. Reuter" and row["lewissplit"] == "TRAIN"
    assert docs.set_index("id").loc[83, "text"] == "UNPROC story all in one"

    parts = reuters_splits(tmp_path / "reuters")
    counts = pd.Series([t for _, ts in expect["TRAIN"] for t in ts]).value_counts()
    top10 = set(counts.sort_index().sort_values(ascending=False, kind="stable").index[:10])
    labels = {t for df in parts.values() for ts in df["label"] for t in ts}
    assert labels <= top10 and len(labels) >= 2
    kept = {split: {i for i, ts in expect[split] if set(ts) & top10} for split in expect}
    assert set(parts["train"]["id"]) | set(parts["val"]["id"]) == kept["TRAIN"]
    assert set(parts["test"]["id"]) == kept["TEST"]
    assert len(parts["val"]) == round(0.1 * len(kept["TRAIN"]))
    assert any(len(ts) == 2 for ts in parts["train"]["label"])  # multi-label rows survive
    assert 81 not in set(parts["test"]["id"])  # TOPICS="NO" is not ModApte


def test_reuters_recipe_trains_and_evaluates_multilabel(tmp_path):
    """The documented recipe, on the small files: prepare, train (multi-label) and eval through the CLI."""
    write_reuters(tmp_path / "reuters")
    out, model = tmp_path / "r10", tmp_path / "model"
    assert cli.main(["-q", "prepare", "reuters-10", "--source", str(tmp_path / "reuters"), "--output", str(out)]) == 0
    rc = cli.main(
        ["-q", "train", "--train", str(out / "train.jsonl"), "--val", str(out / "val.jsonl"), "--multilabel",
         "--label-column", "label", "--set", "encoder.max_length=32", "--output", str(model)]
    )  # fmt: skip
    assert rc == 0
    assert (
        cli.main(
            ["-q", "eval", "--bundle", str(model), "--data", str(out / "test.jsonl"), "--report", str(tmp_path / "rep")]
        )
        == 0
    )
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["metrics"]["n"] == len(pd.read_json(out / "test.jsonl", lines=True))
    assert "subset_accuracy" in report["metrics"]
