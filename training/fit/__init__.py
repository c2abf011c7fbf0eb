"""Fitting: Keras callbacks and the resumable ``model.fit`` (a backbone in two phases), the
checkpoints that SIGTERM keeps, and the tf.distribute strategy."""
