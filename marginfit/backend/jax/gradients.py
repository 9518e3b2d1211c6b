"""JAX's gradient primitive: the penalty's forward pass as a function of a
zero perturbation added where it differentiates, pulled back by `jax.vjp`
(`marginfit.penalty.GradientPrimitive`); and the input gradients of the
attacks."""

import contextlib

import jax
import jax.numpy as jnp
import keras

from marginfit import penalty


class PerturbationGradients(penalty.GradientPrimitive):
    """Records a function as a function of a zero perturbation added to
    each tensor it hooks; the gradient with respect to a perturbation is
    the gradient with respect to that tensor.

    The function runs in its own `keras.StatelessScope` over the model's
    (and its optimizer's) variables; its variable updates (moving
    statistics, seed states) are assigned afterwards, in the enclosing
    scope.

    Args:
        model: The model whose variables the function reads.
    """

    def __init__(self, model):
        self.model = model

    def record(self, function, x):
        variables = list(self.model.variables)
        optimizer = getattr(self.model, "optimizer", None)  # absent before compile()
        if optimizer is not None:
            variables += list(optimizer.variables)
        values = [variable.value for variable in variables]
        shapes = {}

        def run(perturbations):
            def hook(name, tensor):
                if perturbations is None:
                    shapes[name] = jax.ShapeDtypeStruct(tensor.shape, tensor.dtype)
                    return tensor
                return tensor + perturbations[name].astype(tensor.dtype)

            hook.perturbs = True
            with keras.StatelessScope(state_mapping=list(zip(variables, values))) as scope:
                differentiable, aux = function(x, hook)
            updated = [scope.get_current_value(variable) for variable in variables]
            return differentiable, (aux, updated)

        jax.eval_shape(lambda: run(None)[0])
        zeros = {name: jnp.zeros(shape.shape, shape.dtype) for name, shape in shapes.items()}
        differentiable, pullback, (aux, updated) = jax.vjp(run, zeros, has_aux=True)
        for variable, before, after in zip(variables, values, updated):
            if after is not None and after is not before:
                variable.assign(after)
        return aux, PerturbationRecording(pullback, differentiable)


class PerturbationRecording(penalty.Recording):
    """The `Recording` of a `PerturbationGradients` pass."""

    def __init__(self, pullback, differentiable):
        self.pullback = pullback
        self.differentiable = differentiable

    def gradients(self, of, seed, wrt):
        cotangents = {
            key: seed.astype(value.dtype) if key == of else jnp.zeros_like(value)
            for key, value in self.differentiable.items()
        }
        (gradients,) = self.pullback(cotangents)
        return [gradients[name] for name in wrt]

    def unrecorded(self):
        # JAX differentiates functions, not records: what is not wanted in
        # the weights' gradient is cut by `stop_gradient` where it is used.
        return contextlib.nullcontext()


def input_gradient(function, x):
    """``[batch, ...]`` gradient of ``sum(function(x))`` with respect to
    the float array ``x``."""
    return jax.grad(lambda points: jnp.sum(function(points)))(x)


def outputs_and_jacobian(function, x):
    """``(outputs, jacobian)``: ``function(x)``, ``[batch, classes]``, and
    each example's ``[batch, classes, ...]`` Jacobian with respect to its
    own row of ``x`` (examples are independent): one backward pass per
    class, vectorised."""
    outputs, pullback = jax.vjp(function, x)
    classes = outputs.shape[-1]
    one_hots = jnp.broadcast_to(
        jnp.eye(classes, dtype=outputs.dtype)[:, None, :], (classes, *outputs.shape)
    )
    (rows,) = jax.vmap(pullback)(one_hots)  # [classes, batch, ...]
    return outputs, jnp.moveaxis(rows, 0, 1)
