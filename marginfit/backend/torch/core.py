"""The label check inside a PyTorch step, and functions of batches."""

import keras
import torch

from marginfit import labels as labels_lib


def class_indices(labels, num_classes):
    """`marginfit.backend.class_indices` on PyTorch: ``[batch]`` int64 class
    indices; a label out of range stops the (eager) step with the message of
    `marginfit.labels`."""
    labels = keras.ops.convert_to_tensor(labels)
    if labels_lib.is_one_hot(labels.shape, num_classes):
        return torch.argmax(labels, dim=-1)
    indices = torch.reshape(labels, (-1,)).long()
    if indices.numel() and int(indices.min()) < 0:
        raise ValueError(labels_lib.negative_label_message())
    if indices.numel() and int(indices.max()) >= num_classes:
        raise ValueError(labels_lib.large_label_message(num_classes))
    return indices


def traced(model, function):
    """``function`` of batches (tensors, or lists or dicts of them), run
    eagerly; returns numpy arrays."""
    del model

    def run(*args):
        tensors = [keras.tree.map_structure(keras.ops.convert_to_tensor, arg) for arg in args]
        return [keras.ops.convert_to_numpy(t) for t in function(*tensors)]

    return run
