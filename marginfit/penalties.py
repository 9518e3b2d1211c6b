"""`Penalties`: several penalties in one step, on one shared forward pass."""

import keras
from keras import ops

from marginfit.penalty import Penalty, PenaltyResult, Recording, check_penalty


@keras.saving.register_keras_serializable(package="marginfit")
class Penalties(Penalty):
    """The sum of several penalties' terms, each logged under its own name.

    ```python
    model = marginfit.MarginModel(inputs, logits, penalty=[
        marginfit.LargeMargin(["input"]),
        marginfit.InputGradientPenalty(weight=10.0),
    ])  # logs margin_loss, input_gradient_loss, dead_rate, ...
    ```

    The penalties whose `Penalty.shares_pass` allows it run their `forward`
    in one recorded forward pass of the model and take their gradients from
    its one `Recording`; the others (an inner maximisation, as TRADES'; a
    margin with ``coupling="inference"`` in training) run their own pass.
    The step's outputs (what `compute_loss` and the compiled metrics see)
    are the shared pass's, else the first penalty's. `MarginModel` makes
    this of a list given as ``penalty=``.

    Args:
        penalties: `marginfit.Penalty` objects (or their configs), with
            distinct names and metric names; a `Penalties` among them is
            spread out.
    """

    name = "penalties"

    def __init__(self, penalties):
        super().__init__()
        members = []
        for penalty in penalties:
            penalty = check_penalty(penalty)
            if penalty is None:
                raise TypeError("`Penalties` takes penalties; received None among them.")
            members += penalty.penalties if isinstance(penalty, Penalties) else [penalty]
        if not members:
            raise ValueError("`Penalties` is empty: give at least one penalty.")
        _check_distinct([p.name for p in members], "penalties named", "one of each")
        self.penalties = tuple(members)
        self.layers = tuple(dict.fromkeys(layer for p in members for layer in p.layers))
        self.quiet_metrics = tuple(name for p in members for name in p.quiet_metrics)

    loss_name = None  # each member logs its own <name>_loss

    def __call__(self, step):
        shared = self._shared(step)
        results = {}
        if shared:
            outputs, aux, recording = self.recorded_pass(step)
            for index, (penalty, one_aux) in enumerate(zip(shared, aux)):
                view = _Prefixed(recording, f"{index}/")
                results[penalty.name] = penalty.finish(step, outputs, one_aux, view)
        for penalty in self.penalties:
            if penalty.name not in results:
                results[penalty.name] = penalty(step)
        ordered = [results[p.name] for p in self.penalties]
        outputs = results[shared[0].name].outputs if shared else ordered[0].outputs
        batch_size = ops.shape(step.model.penalty_head(outputs))[0]
        metrics = {}
        for penalty, result in zip(self.penalties, ordered):
            metrics[penalty.loss_name] = (result.value, batch_size)
            metrics.update(result.metrics)
        loss = sum(result.loss for result in ordered)
        value = sum(result.value for result in ordered)
        return PenaltyResult(outputs, loss, value, metrics)

    def forward(self, step, outputs):
        differentiable, aux = {}, []
        for index, penalty in enumerate(self._shared(step)):
            own, one_aux = penalty.forward(step, outputs)
            differentiable.update({f"{index}/{key}": value for key, value in own.items()})
            aux.append(one_aux)
        return differentiable, aux

    def _shared(self, step):
        """The penalties that run in the shared pass of ``step``."""
        return [p for p in self.penalties if p.shares_pass(step)]

    def make_metrics(self):
        """Each penalty's ``<name>_loss`` mean and its own metrics."""
        metrics, evaluation_only = [], []
        for penalty in self.penalties:
            own, evaluation = penalty.make_metrics()
            metrics += [keras.metrics.Mean(name=penalty.loss_name), *own]
            evaluation_only += evaluation
        _check_distinct([m.name for m in metrics], "metrics named", "distinct metrics")
        return metrics, tuple(evaluation_only)

    def check_model(self, model):
        for penalty in self.penalties:
            penalty.check_model(model)

    def check_ready(self):
        for penalty in self.penalties:
            penalty.check_ready()

    def get_config(self):
        return {"penalties": [keras.saving.serialize_keras_object(p) for p in self.penalties]}


def _check_distinct(names, what, fix):
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"`Penalties` has two {what} {repeated}: each name is one log. Give {fix} "
            "(one `LargeMargin` carries several layers)."
        )


class _Prefixed(Recording):
    """One penalty's view of the shared `Recording`: its keys, prefixed."""

    def __init__(self, recording, prefix):
        self.recording = recording
        self.prefix = prefix

    def gradients(self, of, seed, wrt):
        return self.recording.gradients(self.prefix + of, seed, wrt)

    def unrecorded(self):
        return self.recording.unrecorded()
