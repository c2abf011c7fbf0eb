"""Audit of labelled images before training: unreadable and odd files, exact and near duplicates
(also under different labels), likely label errors by confident learning, images that look like
no class, and class imbalance. ``python -m training audit`` runs it alone; the training job runs
it first (``--audit``)."""
