"""Data: the sources read (folders, built-in sets, the capture store), the images scanned and
their duplicates grouped, labels encoded, the splits, and the tf.data pipelines."""
