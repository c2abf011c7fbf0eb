"""Exact and near duplicates.

Exact duplicates share the sha256 of their decoded pixels (size, mode and bytes), so a PNG saved
again as a BMP is still exact. Near duplicates are found in two stages: candidates are pairs whose
64-bit perceptual hashes (``imagehash.phash``: the signs of the 8x8 lowest DCT frequencies of a
32x32 greyscale copy) differ in at most :data:`PHASH_DISTANCE` bits; a candidate is kept when the
Pearson correlation of the two 32x32 greyscale thumbnails is at least :data:`MIN_CORRELATION`.
The hash makes the search cheap; the correlation, which ignores brightness and contrast, rejects
different images whose hashes happen to agree. A slightly cropped copy is matched by further
thumbnails of each image, cut by each of :data:`CROPS` of each side first: the best pairing
(whole-whole, whole-cut, cut-whole) counts. Pairs are joined into groups (connected
components), so a group holds every copy of one picture.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import imagehash
import numpy as np
from PIL import Image
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# Bits of the 64-bit pHash two near duplicates may differ in (candidates only): cropped copies
# of the built-in set reach 14.
PHASH_DISTANCE = 14
# Correlation of the 32x32 greyscale thumbnails that confirms a candidate.
MIN_CORRELATION = 0.98
THUMBNAIL_SIDE = 32
# Shares of each side cut off for the further thumbnails.
CROPS = (0.02, 0.04)
# Candidate pairs whose thumbnails are compared at once (bounds the memory: 1 GB at 32x32).
PAIR_CHUNK = 100_000
# Hashes compared at once in the all-pairs search (rows x all columns of uint64: 40 MB a
# block at 10,000 images).
CHUNK = 512


def pixel_digest(image: Image.Image) -> str:
    """sha256 of the decoded pixels with their size and mode."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def thumbnail(image: Image.Image, crop: float = 0.0) -> np.ndarray:
    """The 32x32 greyscale copy both stages compare, ``uint8``, of the image less ``crop`` of
    each side."""
    grey = image.convert("L") if image.mode != "L" else image
    size = (THUMBNAIL_SIDE, THUMBNAIL_SIDE)
    box = (crop * grey.width, crop * grey.height, (1 - crop) * grey.width, (1 - crop) * grey.height)
    resized = grey.resize(size, Image.Resampling.LANCZOS, box=box)
    return np.asarray(resized, dtype=np.uint8)


def phash_bits(thumbnail_pixels: np.ndarray) -> np.uint64:
    """The 64-bit perceptual hash of a thumbnail, as one unsigned integer."""
    bits = imagehash.phash(Image.fromarray(thumbnail_pixels)).hash.reshape(-1)
    return np.uint64(int("".join("1" if bit else "0" for bit in bits), 2))


def candidate_pairs(hashes: np.ndarray, start: int, max_distance: int = PHASH_DISTANCE):
    """``(P, 2)`` index pairs ``i < j``, ``i`` in the block of :data:`CHUNK` rows at ``start``,
    whose hashes differ in at most ``max_distance`` bits (a popcount over all columns)."""
    block = hashes[start : start + CHUNK]
    distances = np.bitwise_count(block[:, np.newaxis] ^ hashes[np.newaxis, :])
    rows, columns = np.nonzero(distances <= max_distance)
    rows = rows + start
    keep = rows < columns
    return np.stack([rows[keep], columns[keep]], axis=1)


def near_pairs(hashes: np.ndarray, thumbnails: np.ndarray, cut: np.ndarray):
    """Confirmed near-duplicate pairs and their correlations, block by block, so that memory
    stays bounded however many candidates the hashes give."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    pairs, values = [np.zeros((0, 2), dtype=np.int64)], [np.zeros(0, dtype=np.float32)]
    for start in range(0, len(hashes), CHUNK):
        candidates = candidate_pairs(hashes, start)
        correlation = correlations(thumbnails, candidates, cut)
        confirmed = correlation >= MIN_CORRELATION
        pairs.append(candidates[confirmed])
        values.append(correlation[confirmed])
    return np.concatenate(pairs), np.concatenate(values)


def _unit(thumbnails: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = thumbnails.reshape(len(thumbnails), -1).astype(np.float32)
    centred = flat - flat.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(centred, axis=1)
    flat_image = norms < 1e-3
    return centred / np.where(flat_image, 1.0, norms)[:, np.newaxis], flat_image


def correlations(thumbnails: np.ndarray, pairs: np.ndarray, cut: np.ndarray | None = None):
    """Pearson correlation of the thumbnails of each pair (1 for two flat images); with the
    ``cut`` thumbnails ``(N, len(CROPS), 32, 32)``, the best of whole-whole, whole-cut and
    cut-whole."""
    unit, flat_image = _unit(thumbnails)
    cuts = [] if cut is None else [_unit(cut[:, k])[0] for k in range(cut.shape[1])]
    values = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), PAIR_CHUNK):
        first, second = pairs[start : start + PAIR_CHUNK, 0], pairs[start : start + PAIR_CHUNK, 1]
        best = np.einsum("ij,ij->i", unit[first], unit[second])
        for cut_unit in cuts:
            best = np.maximum(best, np.einsum("ij,ij->i", unit[first], cut_unit[second]))
            best = np.maximum(best, np.einsum("ij,ij->i", cut_unit[first], unit[second]))
        values[start : start + PAIR_CHUNK] = np.where(
            flat_image[first] & flat_image[second], 1.0, best
        )
    return values


def groups_from_pairs(count: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected components of ``pairs`` with more than one member, each sorted, in order of
    their first member."""
    if len(pairs) == 0:
        return []
    graph = coo_matrix(
        (np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(count, count)
    ).tocsr()
    _, component = connected_components(graph, directed=False)
    sizes = np.bincount(component)
    members = [np.flatnonzero(component == c) for c in np.flatnonzero(sizes > 1)]
    return sorted(members, key=lambda group: int(group[0]))


@dataclass
class Duplicates:
    """What the duplicate search found, as index groups into the audited images."""

    exact: list[np.ndarray]
    near: list[np.ndarray]  # every group of copies, exact ones included
    pairs: np.ndarray  # (P, 2) confirmed near-duplicate pairs
    pair_distance: np.ndarray  # (P,) pHash bits apart
    pair_correlation: np.ndarray  # (P,)

    def group_ids(self, count: int) -> np.ndarray:
        """``(count,)`` group id of each image: images of one group share it, every other image
        has its own. The split keeps each id within one split."""
        ids = np.arange(count)
        for group in self.near:
            ids[group] = group[0]
        return ids


def find_duplicates(
    digests: list[str], thumbnails: np.ndarray, hashes: np.ndarray, cut: np.ndarray
) -> Duplicates:
    """Exact groups from ``digests``; near groups from ``hashes`` confirmed on ``thumbnails``
    (and the ``cut`` ones)."""
    count = len(digests)
    _, first, inverse = np.unique(np.asarray(digests), return_index=True, return_inverse=True)
    exact_pairs = np.stack([first[inverse], np.arange(count)], axis=1)
    exact_pairs = exact_pairs[exact_pairs[:, 0] != exact_pairs[:, 1]]
    pairs, values = near_pairs(hashes, thumbnails, cut)
    distance = np.bitwise_count(hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]).astype(int)
    every_pair = np.concatenate([pairs, np.sort(exact_pairs, axis=1)])
    return Duplicates(
        exact=groups_from_pairs(count, exact_pairs),
        near=groups_from_pairs(count, every_pair),
        pairs=pairs,
        pair_distance=distance,
        pair_correlation=values,
    )


def label_conflicts(groups: list[np.ndarray], labels: np.ndarray) -> list[np.ndarray]:
    """The groups whose members are filed under more than one label."""
    return [group for group in groups if len(np.unique(labels[group])) > 1]


def keep_one_per_group(groups: list[np.ndarray], labels: np.ndarray) -> np.ndarray:
    """Indices ``--drop-duplicates`` removes: all members of each group but one, the first of
    those filed under the group's most common label."""
    dropped = []
    for group in groups:
        values, counts = np.unique(labels[group], return_counts=True)
        majority = values[np.argmax(counts)]
        keep = group[np.flatnonzero(labels[group] == majority)[0]]
        dropped += [int(index) for index in group if index != keep]
    return np.asarray(sorted(dropped), dtype=np.int64)
