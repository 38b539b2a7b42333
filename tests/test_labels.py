import numpy as np
import pandas as pd
import pytest

from fusion.errors import DataError
from fusion.labels import LabelSpace, normalize_labels


def test_multiclass_string_column():
    norm = normalize_labels(pd.Series(["b", "a", "b"]), multilabel=False)
    space = LabelSpace.infer(norm, multilabel=False)
    assert space.classes == ["a", "b"]
    y = space.encode(norm)
    assert y.tolist() == [1, 0, 1] and y.dtype == np.int64
    assert space.decode(y) == ["b", "a", "b"]


def test_multilabel_lists_including_empty_sets():
    norm = normalize_labels([["x", "y"], [], ["y"], None], multilabel=True)
    assert norm == [["x", "y"], [], ["y"], []]
    space = LabelSpace.infer(norm, multilabel=True)
    y = space.encode(norm)
    assert y.tolist() == [[1, 1], [0, 0], [0, 1], [0, 0]]
    assert space.decode(y) == [["x", "y"], [], ["y"], []]


def test_multilabel_separator_strings():
    norm = normalize_labels(["x|y", "y", ""], multilabel=True, separator="|")
    assert norm == [["x", "y"], ["y"], []]


def test_indicator_columns_both_modes():
    df = pd.DataFrame({"sport": [1, 0, 0], "tech": [0, 1, 1]})
    assert normalize_labels(df, multilabel=True) == [["sport"], ["tech"], ["tech"]]
    assert normalize_labels(df, multilabel=False) == ["sport", "tech", "tech"]
    two = pd.DataFrame({"a": [1], "b": [1]})
    with pytest.raises(DataError, match="multiclass mode needs exactly one"):
        normalize_labels(two, multilabel=False)
    with pytest.raises(DataError, match=r"'b' must hold only 0/1.*row 0"):
        normalize_labels(pd.DataFrame({"a": [0], "b": [2]}), multilabel=True)


def test_unknown_labels_are_named():
    space = LabelSpace(["a", "b"])
    with pytest.raises(DataError, match=r"unknown label\(s\) \['z'\].*knows \['a', 'b'\]"):
        space.encode(["a", "z"])


def test_multiclass_rejects_missing_and_multiple_labels():
    with pytest.raises(DataError, match="row 1 has no label"):
        normalize_labels(["a", None], multilabel=False)
    with pytest.raises(DataError, match="row 0 has 2 labels"):
        normalize_labels([["a", "b"]], multilabel=False)


def test_roundtrip_dict():
    s = LabelSpace(["a", "b", "c"], multilabel=True)
    assert LabelSpace.from_dict(s.to_dict()) == s


def test_multilabel_cells_split_on_the_default_separator_that_predict_writes():
    """`labelfuse predict` joins a multi-label prediction with '|' in CSV: that file trains as written."""
    from fusion.config import LabelsConfig

    sep = LabelsConfig().label_separator
    assert normalize_labels(["business|politics", "sports", ""], multilabel=True, separator=sep) == [
        ["business", "politics"], ["sports"], []]  # fmt: skip
    assert normalize_labels(["a|b"], multilabel=False, separator=sep) == ["a|b"]  # one class name in multiclass
