"""`marginfit.Distillation` on a linear student and teacher, against the
float64 closed form of Hinton et al.'s term and its gradient; the teacher
is neither trained nor saved; composed with the margin."""

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip
from nets import float64

import marginfit

T = 3.0
WEIGHT = 0.8
RNG = np.random.default_rng(2)
X = RNG.normal(size=(10, 6))
Y = np.arange(10) % 4


def linear(name, seed, penalty=None, cls=marginfit.MarginModel):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,))
    logits = keras.layers.Dense(4, name=f"{name}_logits")(inputs)
    return cls(inputs, logits, penalty=penalty) if penalty else keras.Model(inputs, logits)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def reference(student, teacher, x, y):
    """``(term, gradients of CE + WEIGHT * term)``: ``T^2 KL(p_t || p_s)`` at
    temperature T and its ``[W, b]`` gradients, ``d/ds = T (q - p_t)``."""
    (w, b), (wt, bt) = student, teacher
    s, t = x @ w + b, x @ wt + bt
    pt, q = softmax(t / T), softmax(s / T)
    term = T**2 * np.mean(np.sum(pt * (np.log(pt) - np.log(q)), -1))
    dz = (softmax(s) - np.eye(4)[y] + WEIGHT * T * (q - pt)) / len(x)
    return term, [x.T @ dz, dz.sum(0)]


def test_the_term_and_its_step_are_the_closed_form():
    with float64():
        teacher = linear("teacher", 5)
        model = linear("student", 1, marginfit.Distillation(teacher, T, WEIGHT))
        model.compile(keras.optimizers.SGD(0.5), keras.losses.SparseCategoricalCrossentropy(True))
        student = [w.numpy() for w in model.trainable_weights]
        fixed = [w.numpy() for w in teacher.weights]
        logs = model.evaluate(X, Y, batch_size=len(X), return_dict=True, verbose=0)
        model.fit(X, Y, batch_size=len(X), epochs=1, verbose=0)
        term, gradients = reference(student, fixed, X, Y)
    np.testing.assert_allclose(logs["distillation_loss"], term, rtol=1e-9)
    assert term > 1e-2
    for w0, w1, g in zip(student, model.trainable_weights, gradients, strict=True):
        np.testing.assert_allclose(w1.numpy(), w0 - 0.5 * g, rtol=1e-9, atol=1e-12)
    for before, after in zip(fixed, teacher.weights):  # the teacher did not train
        np.testing.assert_array_equal(after.numpy(), before)
    assert len(model.weights) == 2  # nor is it among the student's weights


def test_the_teacher_is_saved_by_reference_only(tmp_path):
    teacher = linear("teacher", 5)
    teacher.save(tmp_path / "teacher.keras")
    x = X.astype("float32")
    by_path = marginfit.Distillation(str(tmp_path / "teacher.keras"), temperature=2.0)
    revived = assert_config_round_trip(by_path)
    np.testing.assert_array_equal(revived.teacher.predict(x, verbose=0), teacher(x).numpy())

    model = linear("student", 1, marginfit.Distillation(teacher))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    model.save(tmp_path / "student.keras")
    loaded = keras.models.load_model(tmp_path / "student.keras")
    assert loaded.penalty.teacher is None
    loaded.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    with pytest.raises(ValueError, match="Distillation has no teacher"):
        loaded.fit(x, Y, verbose=0)
    loaded.penalty.teacher = teacher
    assert np.isfinite(loaded.fit(x, Y, verbose=0).history["distillation_loss"][0])


def test_composed_with_the_margin_each_term_is_its_own():
    """With the margin in `Penalties`: the distillation term is the one it
    gives alone, the margin's too (one shared forward pass)."""
    teacher = linear("teacher", 5)
    margin = marginfit.LargeMargin(["input"], gamma=2.0, competitors="top", balance=0.0)
    distillation = marginfit.Distillation(teacher, T, WEIGHT)
    logs = {}
    for label, penalty in [
        ("both", [margin, distillation]),
        ("alone", margin),
        ("alone", distillation),
    ]:
        model = linear("student", 1, penalty)
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(True))
        found = model.evaluate(X.astype("float32"), Y, batch_size=10, return_dict=True, verbose=0)
        logs.update({f"{key} {label}": value for key, value in found.items()})
    for name in ["margin_loss", "distillation_loss"]:
        np.testing.assert_allclose(logs[f"{name} both"], logs[f"{name} alone"], rtol=1e-6)


def test_bad_arguments_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="`teacher_output='scores'` is not supported"):
        marginfit.Distillation(None, teacher_output="scores")
    with pytest.raises(TypeError, match="`teacher` must be a keras.Model"):
        marginfit.Distillation(3)
