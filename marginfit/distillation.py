"""Knowledge distillation (Hinton et al. 2015, arXiv 1503.02531) as a
`marginfit.Penalty`, so that it composes with the margin, the other
penalties and the update rules; the divergence is Keras' own
`keras.distillation.LogitsDistillation`."""

import keras
from keras import ops

from marginfit import attacks
from marginfit.penalty import Penalty, PenaltyResult

_TEACHER_OUTPUTS = ("logits", "probabilities")


@keras.saving.register_keras_serializable(package="marginfit")
class Distillation(Penalty):
    """``weight * T^2 * KL(softmax(t / T) || softmax(s / T))``, batch mean,
    ``t`` the teacher's and ``s`` the student's logits (Keras'
    `LogitsDistillation`, which applies no sample weights).

    ```python
    model = marginfit.MarginModel(inputs, logits, penalty=[
        marginfit.LargeMargin(["input"]), marginfit.Distillation(teacher)])
    ```

    The teacher runs in inference mode, carries no gradient and is not one
    of the student's layers: it is neither trained nor saved with it. Give
    a ``.keras`` path to save it by reference (the file is loaded when the
    penalty is, and must stay where it is); a student reloaded without a
    teacher refuses to train until ``model.penalty.teacher`` is set.

    Args:
        teacher: A `keras.Model` of the student's inputs, a ``.keras`` path,
            or None (set it before training).
        temperature: ``T`` > 0; 3.0, Keras' default (Hinton et al. use 1-20).
        weight: Multiplier of the term in the total loss, >= 0.
        teacher_output: What the teacher emits, ``"logits"`` or
            ``"probabilities"``.
    """

    name = "distillation"  # logged as distillation_loss

    def __init__(self, teacher=None, temperature=3.0, weight=1.0, teacher_output="logits"):
        super().__init__(weight)
        if teacher_output not in _TEACHER_OUTPUTS:
            raise ValueError(
                f"`teacher_output={teacher_output!r}` is not supported: say what the teacher "
                "emits with 'logits' or 'probabilities'."
            )
        # The loss as an instance: by its string name, LogitsDistillation
        # compares the logits themselves (no softmax, no T^2).
        self.divergence = keras.distillation.LogitsDistillation(
            temperature=temperature, loss=keras.losses.KLDivergence()
        )
        self.teacher_output = teacher_output
        self.path = teacher if isinstance(teacher, str) else None
        self.teacher = keras.saving.load_model(teacher) if self.path else teacher
        if self.teacher is not None and not isinstance(self.teacher, keras.Model):
            raise TypeError(f"`teacher` must be a keras.Model or a .keras path; got {teacher!r}.")

    def forward(self, step, outputs):
        return {}, None

    def check_ready(self):
        if self.teacher is None:
            raise ValueError(
                "Distillation has no teacher (it is not saved with the student): set "
                "`model.penalty.teacher = teacher` (or pass a .keras path) before training."
            )

    def finish(self, step, outputs, aux, recording):
        floatx = keras.backend.floatx()
        taught = ops.cast(ops.stop_gradient(self.teacher(step.x, training=False)), floatx)
        if self.teacher_output == "probabilities":
            taught = ops.log(ops.maximum(taught, 1e-30))
        student = ops.cast(attacks._as_logits(step.model, outputs), floatx)
        value = self.divergence.compute_loss(taught, student)
        return PenaltyResult(outputs, self.weight * value, value)

    def get_config(self):
        return {
            **super().get_config(),
            "teacher": self.path,
            "temperature": self.divergence.temperature,
            "teacher_output": self.teacher_output,
        }
