import numpy as np
import pytest

from advanced_training_utils.app.audio.targets import encode_targets, parse_target_names


def test_text_target_is_classification_with_sorted_classes():
    y, task, names = encode_targets({"emotion": ["sad", "angry", "happy", "sad"]})
    assert task == "classification" and names == ["angry", "happy", "sad"]
    assert y.dtype == np.int64 and y.tolist() == [2, 0, 1, 2]


def test_numeric_targets_are_regression():
    y, task, names = encode_targets({"valence": ["0.5", "-1", "2e-1"], "arousal": ["1", "0", "3"]})
    assert task == "regression" and names is None
    assert y.dtype == np.float32 and y.shape == (3, 2)
    np.testing.assert_array_equal(y, np.array([[0.5, 1], [-1, 0], [0.2, 3]], np.float32))
    y1, task1, _ = encode_targets({"valence": ["1", "2"]})
    assert task1 == "regression" and y1.shape == (2, 1)


def test_numeric_labels_forced_to_classes_sort_numerically():
    y, task, names = encode_targets({"level": ["10", "2", "1", "2"]}, task="classification")
    assert names == ["1", "2", "10"] and y.tolist() == [2, 1, 0, 1]


@pytest.mark.parametrize("columns, task, match", [
    ({"a": ["x", "y"], "b": ["1", "2"]}, "auto",
     r"classification needs exactly one target column, got \['a', 'b'\]"),
    ({"v": ["1", ""]}, "auto", r"target column 'v', data row 2: empty value"),
    ({"v": ["1", "nan"]}, "regression", r"target column 'v', data row 2: 'nan' is not a finite"),
    ({"v": ["1", "x"]}, "regression", r"target column 'v', data row 2: 'x' is not a finite"),
    ({"v": ["1"]}, "ordinal", r"task must be one of 'auto', 'classification', 'regression'"),
])
def test_target_errors(columns, task, match):
    with pytest.raises(ValueError, match=match):
        encode_targets(columns, task)


def test_parse_target_names():
    assert parse_target_names("valence, arousal") == ["valence", "arousal"]
    assert parse_target_names(["emotion"]) == ["emotion"]
    for bad in ("", "a,,b", "a,a", []):
        with pytest.raises(ValueError, match="target must name one or more distinct columns"):
            parse_target_names(bad)
