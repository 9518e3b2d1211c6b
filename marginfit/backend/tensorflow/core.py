"""The label check inside a TensorFlow step, and traced functions of batches."""

import tensorflow as tf

from marginfit import labels as labels_lib


def class_indices(labels, num_classes):
    """`marginfit.backend.class_indices` on TensorFlow: ``[batch]`` int32
    class indices; outside XLA a label out of range stops the step with the
    message of `marginfit.labels`."""
    labels = tf.convert_to_tensor(labels)
    if labels_lib.is_one_hot(labels.shape, num_classes):
        return tf.argmax(labels, axis=-1, output_type=tf.int32)
    indices = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    # XLA drops assertions; outside XLA a bad label stops the step here.
    tf.debugging.assert_non_negative(indices, message=labels_lib.negative_label_message())
    tf.debugging.assert_less(
        indices, num_classes, message=labels_lib.large_label_message(num_classes)
    )
    return indices


def traced(model, function):
    """``function`` of batches, traced once per input signature; returns
    numpy arrays."""
    del model
    traced_function = tf.function(function, reduce_retracing=True)
    return lambda *args: [t.numpy() for t in traced_function(*args)]
