"""Bad data given to fit()/evaluate(): a clear first line, before any step,
and the weights untouched."""

import hypothesis
import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import CE, conv_net, digits
from hypothesis import strategies as st

from marginfit import LargeMargin, MarginModel

X, Y = digits(32)


def with_nan(x):
    x = x.copy()
    x[3, 2, 2, 0] = np.nan
    return x


def with_inf(x):
    x = x.copy()
    x[5, 0, 0, 0] = np.inf
    return x


BAD = {
    "NaN in x": (dict(x=with_nan(X)), ValueError, "non-finite values (NaN or inf)"),
    "inf in x": (dict(x=with_inf(X)), ValueError, "the first at index 5"),
    "float labels": (dict(y=Y + 0.5), ValueError, "non-integer class labels"),
    "NaN labels": (dict(y=np.where(Y == 3, np.nan, Y)), ValueError, "y with"),
    "one-hot of the wrong width": (
        dict(y=np.eye(7)[Y % 7]),
        ValueError,
        "one-hot (or soft) labels of width 7",
    ),
    "integer images": (dict(x=(X * 16).astype("int8")), TypeError, "cast it to float"),
    "labels too large": (dict(y=np.where(Y == 3, 10, Y)), ValueError, "outside 0..9 (e.g. 10"),
    "negative labels": (dict(y=np.where(Y == 3, -1, Y)), ValueError, "outside 0..9 (e.g. -1"),
    "empty data": (dict(x=X[:0], y=Y[:0]), ValueError, "received no examples"),
    "fewer labels": (dict(y=Y[:-1]), ValueError, "31 labels for 32 examples"),
    "sample_weight of the wrong length": (
        dict(sample_weight=np.ones(31)),
        ValueError,
        "sample_weight of shape (31,)",
    ),
    "negative sample_weight": (
        dict(sample_weight=np.linspace(-1, 1, 32)),
        ValueError,
        "negative sample weights",
    ),
    "NaN sample_weight": (
        dict(sample_weight=np.full(32, np.nan)),
        ValueError,
        "sample_weight with",
    ),
}


def model():
    net, _ = conv_net(LargeMargin(["input", "dense"], gamma=0.2, alpha=2.0))
    net.compile("adam", loss=CE)
    return net


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_arrays_are_refused_before_any_step(case):
    given, error, message = BAD[case]
    net = model()
    before = [w.numpy() for w in net.weights]
    data = {"x": X, "y": Y, **given}
    with pytest.raises(error) as raised:
        net.fit(**data, epochs=1, verbose=0)
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith("fit() received") and message in first_line, first_line
    with pytest.raises(error, match="^evaluate\\(\\) received"):
        net.evaluate(**data, verbose=0)
    for a, b in zip(before, net.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_bad_validation_data_is_named():
    with pytest.raises(ValueError, match=r"^fit\(validation_data=\.\.\.\) received non-integer"):
        model().fit(X, Y, validation_data=(X, Y + 0.5), verbose=0)


@pytest.mark.parametrize(
    "labels",
    [Y, Y[:, None], np.eye(10)[Y], Y.astype("float32")],
    ids=["sparse", "column", "one-hot", "float"],
)
def test_valid_label_forms_pass(labels):
    net, _ = conv_net(LargeMargin(["input", "dense"], gamma=0.2, alpha=2.0))
    net.compile("adam", loss=None)
    logs = net.evaluate(X, labels, return_dict=True, verbose=0)
    assert np.isfinite(logs["margin_loss"])
    net.fit(X, labels, sample_weight=np.zeros(32), epochs=1, verbose=0)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    corruption=st.sampled_from(sorted(BAD)),
    rows=st.integers(1, 32),
)
def test_random_corruptions_of_a_batch_give_the_named_errors(corruption, rows):
    given, error, message = BAD[corruption]
    # The same corruption on the first `rows` examples.
    data = {"x": X[:rows], "y": Y[:rows]}
    for key, value in given.items():
        full = {"x": X, "y": Y, "sample_weight": np.ones(32)}[key]
        data[key] = value[:rows] if len(value) == len(full) else value
    net = MODEL
    try:
        net.evaluate(**data, verbose=0)
    except (ValueError, TypeError) as raised:
        assert str(raised).startswith("evaluate() received"), str(raised)
    else:
        # Only corruptions that the first rows do not contain may pass.
        assert corruption in {
            "NaN in x",
            "inf in x",
            "NaN labels",
            "labels too large",
            "negative labels",
            "negative sample_weight",
            "fewer labels",
            "sample_weight of the wrong length",
        }


MODEL = model()
keras.utils.set_random_seed(0)


DATASET_CASES = [
    "NaN in x",
    "float labels",
    "one-hot of the wrong width",
    "integer images",
    "labels too large",
    "negative sample_weight",
]


@pytest.mark.parametrize("case", DATASET_CASES)
def test_a_datasets_first_batch_is_checked(case):
    given, error, message = BAD[case]
    data = {"x": X, "y": Y, "sample_weight": np.ones(32, "float32"), **given}
    dataset = tf.data.Dataset.from_tensor_slices(
        (data["x"], data["y"], data["sample_weight"])
    ).batch(32)
    net = model()
    with pytest.raises(error) as raised:
        net.fit(dataset, epochs=1, verbose=0)
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith("fit() (first batch of the dataset) received"), first_line
    assert message in first_line, first_line


@pytest.mark.parametrize("bad_label", [10, -1])
@pytest.mark.parametrize("loss", [None, CE], ids=["margin alone", "with cross-entropy"])
def test_labels_out_of_range_in_a_later_batch_lead_the_error(bad_label, loss):
    """The first batch passes the dataset check; the step's check stops the
    second, and its message is the first line, not "Graph execution error"."""
    y = Y.copy()
    y[20] = bad_label
    dataset = tf.data.Dataset.from_tensor_slices((X, y)).batch(16)
    net, _ = conv_net(LargeMargin(["input", "dense"], gamma=0.2, alpha=2.0))
    net.compile("adam", loss=loss)
    for run in (lambda: net.fit(dataset, verbose=0), lambda: net.evaluate(dataset, verbose=0)):
        with pytest.raises(ValueError) as raised:
            run()
        first_line = str(raised.value).splitlines()[0]
        assert "label" in first_line and "Graph execution" not in first_line, first_line


def test_a_margin_layer_with_integer_output_is_refused():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(8, name="hidden")(inputs)
    bins = keras.layers.Discretization(bin_boundaries=[0.0], name="bins")(hidden)
    embedded = keras.layers.Embedding(2, 3, name="embedded")(bins)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(embedded))
    with pytest.raises(TypeError, match="^Margin layer 'bins' outputs int32"):
        MarginModel(inputs, logits, margin=LargeMargin(["bins"]))
