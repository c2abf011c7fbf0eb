"""Distributed training: the tf.distribute strategy for ``--distribute``, and the TF_CONFIG that
each pod of a Kubernetes Indexed Job builds from its completion index."""

from __future__ import annotations

import json
import os
import re

from training.config import ConfigError
from training.model.cnn import per_example_loss


def ensure_tf_config(environ: dict | None = None) -> dict:
    """The cluster spec of this worker, from ``TF_CONFIG`` or, failing that, from
    ``TRAINING_WORKER_HOSTS`` (host:port of every worker, in index order, separated by commas or
    white space) and ``JOB_COMPLETION_INDEX`` (set by Kubernetes in an Indexed Job). Sets
    ``TF_CONFIG`` when it builds it, since TensorFlow reads it from the environment."""
    environ = os.environ if environ is None else environ
    if environ.get("TF_CONFIG"):
        try:
            return json.loads(environ["TF_CONFIG"])
        except json.JSONDecodeError as exc:
            raise ConfigError(f"TF_CONFIG is not valid JSON ({exc})") from exc
    hosts = [host for host in re.split(r"[\s,]+", environ.get("TRAINING_WORKER_HOSTS", "")) if host]
    index = environ.get("JOB_COMPLETION_INDEX")
    if not hosts or index is None:
        raise ConfigError(
            "--distribute multi-worker needs TF_CONFIG, or TRAINING_WORKER_HOSTS and "
            "JOB_COMPLETION_INDEX (as in k8s/training/multiworker/job.yaml)"
        )
    if not index.isdigit() or int(index) >= len(hosts):
        raise ConfigError(f"JOB_COMPLETION_INDEX={index} does not name one of {len(hosts)} hosts")
    tf_config = {"cluster": {"worker": hosts}, "task": {"type": "worker", "index": int(index)}}
    environ["TF_CONFIG"] = json.dumps(tf_config)
    return tf_config


def is_chief(tf_config: dict | None) -> bool:
    """The chief writes artifacts: the ``chief`` task, or worker 0 when there is none."""
    if not tf_config:
        return True
    task = tf_config.get("task", {})
    if task.get("type") == "chief":
        return True
    return (
        task.get("type") == "worker"
        and int(task.get("index", 0)) == 0
        and ("chief" not in tf_config.get("cluster", {}))
    )


def make_strategy(mode: str):
    """The strategy for ``--distribute``, and this process's TF_CONFIG (None unless multi-worker).

    Must run before any other TensorFlow operation: MultiWorkerMirroredStrategy sets up the
    collective communication of the whole process.
    """
    import tensorflow as tf

    if mode == "none":
        return tf.distribute.get_strategy(), None
    if mode == "mirrored":
        return tf.distribute.MirroredStrategy(), None
    if mode == "multi-worker":
        tf_config = ensure_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy(), tf_config
    raise ConfigError(f"unknown --distribute {mode!r}")


def fit_distributed(
    model,
    strategy,
    train_dataset,
    validation_dataset,
    config,
    callbacks,
    class_weight: dict[int, float] | None = None,
) -> dict[str, list[float]]:
    """``model.fit`` for MultiWorkerMirroredStrategy, which Keras 3's own ``fit`` does not run
    (keras-team/keras#20585): the same gradient descent, written as a ``strategy.run`` loop.

    Loss and accuracy are summed over all replicas, so every worker sees the same numbers, and
    the Keras callbacks (early stopping, learning-rate halving) run on them as in ``fit``.
    Returns the history with ``fit``'s keys.
    """
    import keras

    train_step, test_step = _distributed_steps(model, strategy, config, class_weight)

    def run_epoch(dataset, step) -> tuple[float, float]:
        total_loss = total_correct = total_count = 0.0
        for images, targets in strategy.experimental_distribute_dataset(dataset):
            loss, correct, count = (float(value) for value in step(images, targets))
            total_loss, total_correct, total_count = (
                total_loss + loss,
                total_correct + correct,
                total_count + count,
            )
        return total_loss / max(total_count, 1), total_correct / max(total_count, 1)

    history: dict[str, list[float]] = {}
    callback_list = keras.callbacks.CallbackList(callbacks, model=model)
    model.stop_training = False
    callback_list.on_train_begin()
    for epoch in range(config.epochs):
        callback_list.on_epoch_begin(epoch)
        logs = dict(zip(("loss", "accuracy"), run_epoch(train_dataset, train_step), strict=True))
        if validation_dataset is not None:
            val = run_epoch(validation_dataset, test_step)
            logs.update(val_loss=val[0], val_accuracy=val[1])
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))
        print(
            f"epoch {epoch + 1}/{config.epochs}: "
            + " - ".join(f"{key}: {value:.4f}" for key, value in logs.items())
        )
        callback_list.on_epoch_end(epoch, logs)
        for key, value in logs.items():
            history.setdefault(key, []).append(value)
        if model.stop_training:
            break
    callback_list.on_train_end()
    return history


def _distributed_steps(model, strategy, config, class_weight: dict[int, float] | None) -> tuple:
    """The training and test steps as ``tf.function``s over the strategy's replicas: each
    replica computes the loss of its share of every global batch, the optimizer all-reduces the
    gradients, and the steps return ``(summed loss, correct, images)`` over all replicas."""
    import tensorflow as tf

    loss_of = per_example_loss(config.loss, config.label_smoothing)
    num_classes = model.output_shape[-1]
    weights = tf.constant(
        [(class_weight or {}).get(index, 1.0) for index in range(num_classes)], tf.float32
    )
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)

    def replica_step(images, targets, training: bool):
        if training:
            with tf.GradientTape() as tape:
                logits = model(images, training=True)
                losses = loss_of(targets, logits) * tf.gather(weights, tf.argmax(targets, -1))
                loss = tf.reduce_sum(losses) / tf.cast(config.batch_size, tf.float32)
            gradients = tape.gradient(loss, model.trainable_variables)
            model.optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        else:
            logits = model(images, training=False)
            losses = loss_of(targets, logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1), tf.argmax(targets, -1)), tf.float32)
        count = tf.cast(tf.shape(images)[0], tf.float32)
        return tf.reduce_sum(losses), tf.reduce_sum(correct), count

    @tf.function
    def train_step(images, targets):
        sums = strategy.run(replica_step, args=(images, targets, True))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in sums]

    @tf.function
    def test_step(images, targets):
        sums = strategy.run(replica_step, args=(images, targets, False))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None) for value in sums]

    return train_step, test_step
