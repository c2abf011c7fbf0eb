"""Class activation maps: computed inside the exported graph, and checked against Grad-CAM.

Every classifier this project trains ends in global average pooling followed by one linear
layer (dropout between them is the identity at inference). For such a head, Grad-CAM is the
class activation map of Zhou et al. (CVPR 2016) up to a constant factor:

    CAM_c = ReLU(sum_k w_kc * A_k)

where ``A`` is the last feature map (the pooling's input, or the input of a max pooling just
before it: see :func:`mapped_model`) and ``w`` the head's kernel. The export
adds it as an output, ``cam``: the map of the top class, ``(N, h, w)``, scaled to 0-1 per image,
computed from the feature map the logits already need (one product per image, no gradients).
The parity gate compares it with :func:`grad_cam`, which gets the same map the other way, from
the gradient of the top logit with respect to the feature map (``tf.GradientTape``).
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from service.core.contract import CAM_OUTPUT_NAME, OUTPUT_NAME

# A map whose peak, in logits (what one location adds to the top class's logit, times the
# number of locations), is below this is all zero: no location speaks for the class. A model
# whose feature maps have all but vanished (random weights: about 1e-9 at MobileNetV3-Small's
# last layer) would otherwise have float32 noise scaled up to a full map, and its export and
# Grad-CAM would disagree on noise.
PEAK_FLOOR = 1e-6


def scaled_to_peak(positive: np.ndarray) -> np.ndarray:
    """``(N, h, w)`` non-negative maps in logits, each divided by its peak (all zero below
    :data:`PEAK_FLOOR`): the rule of the exported graph, in numpy."""
    peak = positive.max(axis=(1, 2), keepdims=True)
    return np.where(peak >= PEAK_FLOOR, positive / np.maximum(peak, PEAK_FLOOR), 0.0)


# Why a model has no map (the contract's ``cam_left_out``).
LEFT_OUT = "the head is not global average pooling followed by one linear layer"


@dataclass(frozen=True)
class MappedModel:
    """The classifier seen through its head: one pass gives the logits, the pooled features (the
    head's input) and the feature map under them.

    ``model(image)`` returns ``[logits (N, K), features (N, D), feature map (N, h, w, D)]``;
    ``kernel`` is the head's ``(D, K)`` weights.
    """

    model: keras.Model
    kernel: object  # the logits layer's kernel variable, (D, K)

    @property
    def map_shape(self) -> tuple[int, int]:
        """``(h, w)`` of the feature map, and so of the ``cam`` output."""
        return tuple(int(size) for size in self.model.outputs[2].shape[1:3])


def _producer(tensor):
    """The layer that made a symbolic tensor of a functional model."""
    return tensor._keras_history.operation


def _is_average_pooling(layer) -> bool:
    return (
        isinstance(layer, keras.layers.GlobalAveragePooling2D)
        and not layer.keepdims
        and layer.data_format == "channels_last"
    )


def mapped_model(model: keras.Model) -> MappedModel | None:
    """The model with its last feature map exposed, or None when its head is not global average
    pooling + dropout (optional) + one linear ``logits`` layer.

    The pooling may sit in the model itself (the CNN) or be the last layer of a nested model
    (a ``keras.applications`` backbone built with ``pooling="avg"``); then the nested model is
    called once, as a model that stops before its pooling, and the head is applied after it, so
    the backbone still runs once.
    """
    try:
        head = model.get_layer(OUTPUT_NAME)
    except ValueError:
        return None
    if not isinstance(head, keras.layers.Dense) or head.activation is not keras.activations.linear:
        return None
    between = []
    layer = _producer(head.input)
    while isinstance(layer, keras.layers.Dropout):
        between.append(layer)
        layer = _producer(layer.input)
    if _is_average_pooling(layer):
        features = layer.input
        below = _producer(features)
        if isinstance(below, keras.layers.MaxPooling2D):
            # The CNN's last block pools before the head (7x7 -> 3x3 at 28x28). Each pooled cell
            # passes the gradient to one cell of its window, so the spatial mean of the gradient
            # over the map under the pooling is still w_k / (h * w): Grad-CAM of that map, the
            # last convolution's output, is this same product on it, at its finer grain.
            features = below.input
        return MappedModel(
            keras.Model(model.input, [model.output, head.input, features]), head.kernel
        )
    if isinstance(layer, keras.Model) and layer.layers and _is_average_pooling(layer.layers[-1]):
        if len(layer._inbound_nodes) != 1:
            return None
        pooling = layer.layers[-1]
        trunk = keras.Model(layer.input, pooling.input, name=f"{layer.name}_feature_map")
        (trunk_input,) = layer._inbound_nodes[0].input_tensors
        features = trunk(trunk_input)
        pooled = x = pooling(features)
        for dropout in reversed(between):
            x = dropout(x)
        return MappedModel(keras.Model(model.input, [head(x), pooled, features]), head.kernel)
    return None


def class_activation_map(feature_map, logits, kernel):
    """The map of each image's top class, in TensorFlow (traced into the ONNX graph).

    Args:
        feature_map: ``(N, h, w, D)``, the input of the global average pooling.
        logits: ``(N, K)``; the top class is their argmax (as the answers' top label).
        kernel: the head's ``(D, K)`` weights.

    Returns:
        ``(N, h, w)`` float32: ``ReLU(sum_k w_k,top * A_k)``, divided by its maximum per image
        (all zero when its peak is under :data:`PEAK_FLOOR`).
    """
    import tensorflow as tf

    top = tf.argmax(logits, axis=1)
    weights = tf.transpose(tf.gather(kernel, top, axis=1))  # (N, D)
    _, height, width, depth = feature_map.shape  # static: only the batch is dynamic
    flat = tf.reshape(feature_map, (-1, height * width, depth))
    raw = tf.reshape(tf.matmul(flat, weights[:, :, tf.newaxis]), (-1, height, width))
    positive = tf.nn.relu(raw)
    peak = tf.reduce_max(positive, axis=[1, 2], keepdims=True)
    return tf.where(
        peak >= PEAK_FLOOR, positive / tf.maximum(peak, PEAK_FLOOR), tf.zeros_like(positive)
    )


def grad_cam(mapped: MappedModel, inputs: np.ndarray, batch: int = 64) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., 2017) of each image's top class, scaled to 0-1: the feature
    map weighted by the gradient of the top logit, averaged over the map, then ReLU. It uses
    the head's weights only through the gradient, so it checks the export's product
    independently.

    Returns:
        ``(N, h, w)`` float32.
    """
    import tensorflow as tf

    maps = []
    for start in range(0, len(inputs), batch):
        chunk = tf.convert_to_tensor(inputs[start : start + batch], dtype=tf.float32)
        with tf.GradientTape() as tape:
            logits, _, features = mapped.model(chunk, training=False)
            top = tf.argmax(logits, axis=1)
            chosen = tf.gather(logits, top, axis=1, batch_dims=1)
        gradients = tape.gradient(chosen, features)  # (n, h, w, D)
        alphas = tf.reduce_mean(gradients, axis=[1, 2])  # (n, D)
        # The gradient's spatial mean is w / (h * w): times the map's size, the map is in
        # logits, as the export's, and the same floor applies.
        height, width = features.shape[1:3]
        positive = tf.nn.relu(tf.einsum("nhwd,nd->nhw", features, alphas)).numpy()
        maps.append(scaled_to_peak(positive * (height * width)))
    return np.concatenate(maps).astype(np.float32)


def contract_fields(model: keras.Model) -> dict:
    """The contract's fields about the map of ``model``: its output and shape, or why it has
    none."""
    mapped = mapped_model(model)
    if mapped is None:
        return {"cam_output_name": "", "cam_shape": (), "cam_left_out": LEFT_OUT}
    return {"cam_output_name": CAM_OUTPUT_NAME, "cam_shape": mapped.map_shape, "cam_left_out": ""}
