"""The models people bring from keras-hub, built small from configs (no
download): a BERT text classifier and a ResNet image classifier."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import marginfit

keras_hub = pytest.importorskip("keras_hub")

VOCABULARY = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "dog", "sat", "ran"]
TEXTS = np.array(["the cat sat", "the dog ran", "cat dog", "the the sat ran"] * 6)
LABELS = np.arange(len(TEXTS)) % 3
CE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def bert_classifier(seed=0):
    keras.utils.set_random_seed(seed)
    tokenizer = keras_hub.models.BertTokenizer(vocabulary=VOCABULARY)
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(tokenizer, sequence_length=8)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=len(VOCABULARY), num_layers=1, num_heads=2, hidden_dim=8,
        intermediate_dim=16, max_sequence_length=8,
    )  # fmt: skip
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=preprocessor, activation=None
    )


def exact_distances(features, head, labels):
    """float64 distance of each example to its nearest boundary, measured
    at the features a linear head maps to the logits (exact there)."""
    kernel, bias = (w.astype("float64") for w in head.get_weights())
    scores = features.astype("float64") @ kernel + bias
    rows = np.arange(len(labels))
    with np.errstate(invalid="ignore"):  # the label's own column: 0 / 0
        gaps = (scores[rows, labels][:, None] - scores) / np.linalg.norm(
            kernel[:, labels].T[:, :, None] - kernel[None], axis=1
        )
    gaps[rows, labels] = np.inf
    return gaps.min(axis=1)


def test_a_text_classifier_with_its_preprocessor_is_refused_with_the_fix():
    classifier = bert_classifier()
    with pytest.raises(ValueError, match="BertTextClassifierPreprocessor") as raised:
        marginfit.MarginModel.wrap(classifier, margin=marginfit.LargeMargin(["token_embedding"]))
    assert "dataset.map(preprocessor)" in str(raised.value).splitlines()[0]


def test_a_text_classifier_trains_on_mapped_text_and_reports_exact_distances():
    classifier = bert_classifier()
    preprocessor, classifier.preprocessor = classifier.preprocessor, None
    embedding = f"'{classifier.backbone.name}/token_embedding'"  # bert_backbone, or _<n>
    with pytest.raises(ValueError, match=re.escape(f"layers that embed them: [{embedding}")):
        marginfit.MarginModel.wrap(classifier, margin=marginfit.LargeMargin(["input"]))
    margin = marginfit.LargeMargin(["token_embedding", "pooled_dense"])
    model = marginfit.MarginModel.wrap(classifier, margin=margin)
    model.compile("adam", CE)
    with pytest.raises(TypeError, match="received text .* map a preprocessor"):
        model.fit(TEXTS, LABELS, epochs=1, verbose=0)
    data = tf.data.Dataset.from_tensor_slices((TEXTS, LABELS)).batch(8).map(preprocessor)
    history = model.fit(data, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # The pooled features feed the logits through dropout (off in inference)
    # and a Dense layer: the distance measured there is exact.
    x = keras.tree.map_structure(keras.ops.convert_to_numpy, preprocessor(TEXTS))
    pooled = keras.Model(model.inputs, classifier.backbone.output["pooled_output"])
    expected = exact_distances(
        keras.ops.convert_to_numpy(pooled(x)), model.get_layer("logits"), LABELS
    )
    reported = model.margin_distances(x, LABELS, competitors=2)["pooled_dense"]
    np.testing.assert_allclose(reported, expected, rtol=1e-4, atol=1e-6)


def test_layers_inside_a_transformer_block_or_behind_a_renumbered_name_are_explained():
    classifier = bert_classifier()
    classifier.preprocessor = None
    inner = "transformer_layer_0/self_attention_layer"
    with pytest.raises(ValueError, match="whose call is Python code") as raised:
        marginfit.MarginModel.wrap(classifier, margin=marginfit.LargeMargin([inner]))
    backbone = classifier.backbone.name
    assert f"'{backbone}/transformer_layer_0' (its output)" in str(raised.value)
    assert f"'{backbone}/embeddings_dropout'" in str(raised.value)
    again = bert_classifier()  # built twice in one process: Keras numbers it
    again.preprocessor = None
    renumbered = again.backbone.name
    assert renumbered != backbone
    with pytest.raises(ValueError, match=f"but '{renumbered}/token_embedding' is"):
        marginfit.MarginModel.wrap(
            again, margin=marginfit.LargeMargin([f"{backbone}/token_embedding"])
        )
    marginfit.MarginModel.wrap(again, margin=marginfit.LargeMargin(["token_embedding"]))


def test_an_image_classifier_trains_with_the_margin_at_the_input_and_the_pooled_features():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(16, 16, 3),
    )  # fmt: skip
    classifier = keras_hub.models.ResNetImageClassifier(backbone, num_classes=4, activation=None)
    model = marginfit.MarginModel.wrap(
        classifier, margin=marginfit.LargeMargin(["input", "pooler"])
    )
    model.compile("adam", CE)
    x = np.random.RandomState(0).rand(16, 16, 16, 3).astype("float32")
    y = np.arange(16) % 4
    model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    pooled = keras.Model(model.inputs, model.get_layer("pooler").output)
    expected = exact_distances(
        keras.ops.convert_to_numpy(pooled(x)), model.get_layer("predictions"), y
    )
    reported = model.margin_distances(x, y, competitors=3)["pooler"]
    np.testing.assert_allclose(reported, expected, rtol=1e-4, atol=1e-6)
