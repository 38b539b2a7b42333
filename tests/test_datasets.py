import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fusion.config import DataConfig
from fusion.datasets import load_builtin, read_table, split, texts_and_labels, write_table
from fusion.errors import DataError
from tests.fuzz import budget


def test_bbc_news_builtin():
    df = load_builtin("bbc-news")
    assert len(df) == 2225
    assert df["label"].value_counts().to_dict() == {
        "sports": 511,
        "business": 510,
        "politics": 417,
        "tech": 401,
        "entertainment": 386,
    }
    assert df["text"].str.len().min() > 100 and df["id"].is_unique


def test_split_is_stratified_disjoint_and_deterministic(bbc):
    again = split(load_builtin("bbc-news"))
    assert {k: len(v) for k, v in bbc.items()} == {"train": 1557, "val": 223, "test": 445}
    ids = [set(bbc[k]["id"]) for k in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(map(len, ids)) == 2225
    for k in bbc:
        assert bbc[k]["id"].tolist() == again[k]["id"].tolist()
    share = bbc["test"]["label"].value_counts(normalize=True)
    overall = load_builtin("bbc-news")["label"].value_counts(normalize=True)
    assert (share - overall).abs().max() < 0.01
    assert split(load_builtin("bbc-news"), seed=1)["test"]["id"].tolist() != bbc["test"]["id"].tolist()


def test_multilabel_builtin():
    df = load_builtin("bbc-news-multilabel")
    sizes = df["label"].map(len).value_counts().to_dict()
    assert set(sizes) == {0, 1, 2} and all(v > 50 for v in sizes.values())
    assert {c for labels in df["label"] for c in labels} == {"business", "entertainment", "politics", "sports"}
    assert df["id"].tolist() == load_builtin("bbc-news-multilabel")["id"].tolist()


@pytest.mark.parametrize("ext", [".csv", ".jsonl", ".parquet"])
def test_file_roundtrip_and_custom_columns(tmp_path, ext):
    df = pd.DataFrame({"body": ["a", "b"], "topic": ["x", "y"]})
    write_table(df, tmp_path / f"d{ext}")
    back = read_table(tmp_path / f"d{ext}")
    texts, labels = texts_and_labels(back, DataConfig(text_column="body", label_column="topic"))
    assert texts == ["a", "b"] and list(labels) == ["x", "y"]


def test_file_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_table(tmp_path / "none.csv")
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match="unknown extension"):
        read_table(tmp_path / "d.xlsx")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="cannot read"):
        read_table(tmp_path / "bad.parquet")
    df = pd.DataFrame({"text": ["a"], "y": ["b"]})
    with pytest.raises(DataError, match=r"column\(s\) \['label'\] not found; the table has \['text', 'y'\]"):
        texts_and_labels(df, DataConfig())
    assert texts_and_labels(df, DataConfig(), require_labels=False) == (["a"], None)
    with pytest.raises(DataError, match="empty cells at rows \\[1\\]"):
        texts_and_labels(pd.DataFrame({"text": ["a", None], "label": ["x", "y"]}), DataConfig())
    with pytest.raises(DataError, match="unknown built-in"):
        load_builtin("imdb")


# cells a table of texts and ids holds: numbers as text, leading zeros, pandas' "missing" words, quotes, newlines,
# separators and any Unicode that UTF-8 carries (a lone surrogate is refused at every edge, see test_texts.py)
CELL = st.one_of(
    st.sampled_from(["2024", "00123", "1e5", "-0", "NA", "N/A", "null", "NaN", "None", "True", "#N/A", " ", '"', "\t"]),
    st.from_regex(r"\A[0-9.+-]{1,8}\Z"),
    st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
)


@budget(60)
@given(rows=st.lists(st.tuples(CELL, CELL), min_size=1, max_size=6), ext=st.sampled_from([".csv", ".tsv", ".json"]))
def test_a_table_reads_back_every_cell_as_written(tmp_path_factory, rows, ext):
    """pandas guesses column types: "2024" became a number, "00123" the id 123, and "NA" a missing text."""
    path = tmp_path_factory.mktemp("t") / f"d{ext}"
    df = pd.DataFrame(rows, columns=["id", "text"], dtype=object)
    if ext == ".tsv":
        df.to_csv(path, sep="\t", index=False)
    elif ext == ".json":
        df.to_json(path, orient="records")
    else:
        write_table(df, path)
    back = read_table(path)
    assert back.astype(object).values.tolist() == [list(r) for r in rows]


def test_a_text_that_is_not_a_string_is_refused_with_its_row():
    from fusion.classifier import AutoFusionClassifier

    df = pd.DataFrame({"text": ["a", 5, True], "label": ["x", "y", "x"]}, dtype=object)
    with pytest.raises(DataError, match=r"text at row 1 is of type int, not a string \(5\)"):
        AutoFusionClassifier().fit(df)
    for bad in ({"text": "x"}, None, 7):
        with pytest.raises(DataError, match="expected a list of texts or a DataFrame, got"):
            AutoFusionClassifier().fit(bad, ["x"])


LABEL = st.text(st.characters(exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"], exclude_characters="|"), min_size=1)


@budget(40)
@given(sets=st.lists(st.lists(LABEL, max_size=3, unique=True), min_size=1, max_size=5))
def test_label_sets_written_to_csv_read_back_as_the_same_sets(tmp_path_factory, sets):
    """A multi-label table (a label list per row) written to CSV, as `labelfuse predict` and `labels export` write
    it, trains as written: each cell is "a|b", split again on labels.label_separator."""
    from fusion.config import LabelsConfig
    from fusion.labels import normalize_labels

    path = tmp_path_factory.mktemp("t") / "d.csv"
    write_table(pd.DataFrame({"text": ["x"] * len(sets), "label": sets}), path)
    back = read_table(path)["label"]
    assert normalize_labels(back, True, LabelsConfig().label_separator) == [sorted(set(s)) for s in sets]
