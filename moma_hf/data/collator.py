"""PatchCollator: decode, augment and normalise a batch of patches for MoMA, surviving corrupt files.

A corrupt or truncated image is skipped with a `BadImageWarning` that names it, and counted. In training its
slot is filled by a fresh augmentation of a good image of the same batch, so every process keeps the same
batch size (the gathered key queue needs it). In evaluation (``skip_bad_images=True``) the slot keeps a
stand-in crop but gets the label `UNREADABLE` (-100), so metrics leave it out. Once the bad fraction passes
`max_bad_fraction` (after `min_samples_for_threshold` images), it raises; :func:`check_bad_fraction` applies
the same limit to a whole run's counts at its end, whatever their number.
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .feature_cache import ROW_KEY
from .streaming import EPOCH_KEY
from .transforms import load_rgb_image


class BadImageWarning(UserWarning):
    """An image could not be decoded and was skipped by :class:`PatchCollator`."""


class TooManyBadImagesError(ValueError):
    """More images could not be decoded than ``max_bad_fraction`` allows."""


# The label of an evaluation slot whose image could not be decoded: the value the Hugging Face losses and
# metrics ignore. It differs from -1 (an unlabeled example) so the unreadable ones can be counted.
UNREADABLE = -100
# One row of counters for the main process and one for each DataLoader worker (by worker id), so no two
# processes ever add to the same row.
_COUNTER_ROWS = 65


def check_bad_fraction(num_bad: int, num_seen: int, max_fraction: float, examples: Sequence[str] = (),
                       scope: str = "") -> None:
    """Raise :class:`TooManyBadImagesError` when ``num_bad / num_seen`` exceeds ``max_fraction``.

    ``examples`` are some of the unreadable files, for the message; ``scope`` says what was counted
    (e.g. "in the whole training run").
    """
    fraction = num_bad / num_seen if num_seen else 0.0
    if fraction <= max_fraction:
        return
    named = f" Unreadable files include {list(examples)[:10]}." if examples else (
        " Each was named in a BadImageWarning above.")
    raise TooManyBadImagesError(
        f"{num_bad} of {num_seen} images ({fraction:.2%}) could not be decoded{scope}, more than the allowed "
        f"{max_fraction:.2%}.{named} Clean the data (remove or re-export these files), or raise "
        "--max_bad_image_fraction if losing them is acceptable."
    )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _describe(image: Any, position: int) -> str:
    """The file name of an example's image for messages, or its position when it has none."""
    if isinstance(image, dict):
        path = image.get("path")
    elif isinstance(image, (str, os.PathLike)):
        path = image
    else:
        path = getattr(image, "filename", None)
    return str(path) if path else f"example #{position} of the stream (no file path)"


def _as_norm(norm: tuple[Sequence[float], Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = (torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1, 1) for values in norm)
    if mean.shape[0] != 3 or std.shape[0] != 3:
        raise ValueError(f"A normalisation needs 3 means and 3 stds (RGB), got {norm}.")
    return mean, std


def _identity(image: Any) -> list[bytes]:
    """What identifies an image: its path, else its encoded bytes, else its pixels (the augmentation seed reads
    the first part), followed by its bytes when it has both a path and bytes."""
    if isinstance(image, dict) and (image.get("path") or image.get("bytes")):
        return [part for part in (str(image["path"]).encode() if image.get("path") else None, image.get("bytes"))
                if part]
    if isinstance(image, (str, os.PathLike)):
        return [str(image).encode()]
    return [np.asarray(image).tobytes()]  # a decoded PIL image


def example_key(image: Any) -> bytes:
    """A 16-byte digest of an image's path and bytes: its row in a teacher-feature cache.

    Two images with one key have the same path and content, so `PatchCollator` draws the same augmentation for
    both (its seed reads the path, or the bytes without one), and a cache may serve both from one row.
    """
    digest = hashlib.blake2b(digest_size=16)
    for part in _identity(image):
        digest.update(len(part).to_bytes(8, "little"))  # lengths keep (path, bytes) pairs from running together
        digest.update(part)
    return digest.digest()


class PatchCollator:
    """``collate_fn`` for a torch ``DataLoader`` / the Trainer's ``data_collator``.

    Decodes each example's image, augments it once with ``transform`` and normalises that same crop
    with the student's and the teacher's mean/std.

    Args:
        transform: PIL RGB image -> float tensor ``(3, H, W)`` in ``[0, 1]``, not normalised (see
            :mod:`moma_hf.data.transforms`).
        student_norm, teacher_norm: ``(mean, std)``, 3 values each. ``teacher_norm=None`` (no teacher, or
            one that shares the student's input) omits ``teacher_pixel_values``.
        num_labels: when given, a label outside ``range(num_labels)`` raises; -1 marks an unlabeled example.
        max_bad_fraction: the largest tolerated fraction of undecodable images.
        min_samples_for_threshold: the fraction is only checked after this many images, so that one bad
            file among the first few does not stop a run.
        seed: base seed of the augmentation draws (the run's ``--seed``).
        views: when set, an image gets one of ``views`` fixed augmentations: in epoch ``e`` the draws of view
            ``e % views``, seeded from the run seed, the view and the image alone (not its slot), so a
            teacher-feature cache built with the same collator holds the teacher's output for this very crop
            (:meth:`set_views` changes it later).
        feature_cache: a :class:`~moma_hf.data.feature_cache.TeacherFeatureCache` built for ``views``; the batch then
            carries the cached ``teacher_features`` (and ``teacher_logits``) instead of ``teacher_pixel_values``
            (:meth:`use_feature_cache` attaches one later).
        skip_bad_images: for evaluation: an unreadable image's slot gets the label ``UNREADABLE`` (-100) instead
            of a copy of a good image's label, so metrics count only real images; a batch may then be all bad.

    Returns (from ``__call__``):
        ``{"pixel_values": (B, 3, H, W) float32, "teacher_pixel_values": (B, 3, H, W) float32,
        "labels": (B,) int64}``.

    Augmentation is reproducible: each image's random draws are seeded from ``(seed, epoch, the image's path or
    bytes, its slot in the batch)``, not from the global random state. A resumed run therefore augments every
    image exactly as the uninterrupted run did, whatever the Trainer skipped, prefetched or handed to
    DataLoader workers. :class:`~moma_hf.DistillationTrainer` calls :meth:`set_epoch` before each epoch; examples of
    an :class:`~moma_hf.data.streaming.EndlessStream` carry their own epoch.

    A corrupt or truncated image is skipped with a :class:`BadImageWarning` naming its path (or its
    position in this collator's stream) and counted in ``num_seen``/``num_bad``/``bad_files``. Distributed
    training gathers equal batches, so the batch size never shrinks: each skipped slot is filled with a
    fresh augmentation of a good image (and its label) from the same batch, which that image's weight
    in the step slightly raises. The counts live in shared memory, one row per DataLoader worker, so
    ``num_seen``/``num_bad`` (and the threshold) cover every worker of this process; ``bad_files`` holds
    the names this copy saw. Two DataLoaders running the same collator at once may lose a few counts.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        student_norm: tuple[Sequence[float], Sequence[float]],
        teacher_norm: tuple[Sequence[float], Sequence[float]] | None = None,
        num_labels: int | None = None,
        max_bad_fraction: float = 0.01,
        min_samples_for_threshold: int = 100,
        seed: int = 0,
        views: int | None = None,
        feature_cache=None,
        skip_bad_images: bool = False,
    ):
        self.transform = transform
        self.student_norm = _as_norm(student_norm)
        self.teacher_norm = _as_norm(teacher_norm) if teacher_norm is not None else None
        self.num_labels = num_labels
        self.max_bad_fraction = max_bad_fraction
        self.min_samples_for_threshold = min_samples_for_threshold
        self.seed = seed
        self.views, self.feature_cache = None, None
        self.set_views(views)
        self.use_feature_cache(feature_cache)
        self.skip_bad_images = skip_bad_images
        self.epoch = 0
        # (images seen, images unreadable) per process; shared, so DataLoader workers' counts reach the parent.
        self._counts = torch.zeros(_COUNTER_ROWS, 2, dtype=torch.int64).share_memory_()
        self.bad_files: list[str] = []

    @property
    def num_seen(self) -> int:
        """Images collated so far by this collator in this process and its DataLoader workers."""
        return int(self._counts[:, 0].sum())

    @property
    def num_bad(self) -> int:
        """Of ``num_seen``, the images that could not be decoded."""
        return int(self._counts[:, 1].sum())

    def set_epoch(self, epoch: int) -> None:
        """Draw other augmentations in each epoch (DataLoader workers copy this when an epoch starts)."""
        self.epoch = int(epoch)

    def set_views(self, views: int | None) -> None:
        """Augment each image with one of ``views`` fixed views (epoch ``e``: view ``e % views``); None: fresh draws.

        Raises:
            ValueError: ``views`` is not a positive integer, or differs from the views of the attached feature cache.
        """
        if views is not None and (isinstance(views, bool) or not isinstance(views, int) or views < 1):
            raise ValueError(f"views must be a positive integer (or None), got {views!r}.")
        if self.feature_cache is not None and self.feature_cache.views != views:
            raise ValueError(f"The feature cache holds {self.feature_cache.views} views; the collator was given "
                             f"{views}.")
        self.views = views

    def use_feature_cache(self, feature_cache) -> None:
        """Read the teacher's outputs from ``feature_cache`` instead of giving it pixels (None: stop reading them).

        The cache must hold this collator's views (see :meth:`set_views`), so that every cached output belongs to
        the very crop the student sees. Map-style examples must then carry their ``_row`` (see ``add_row_index``);
        a stream's are found by :func:`example_key`.

        Raises:
            ValueError: the cache holds another number of views than the collator draws.
        """
        if feature_cache is not None and feature_cache.views != self.views:
            raise ValueError(f"The feature cache holds {feature_cache.views} views; the collator was given "
                             f"{self.views}.")
        self.feature_cache = feature_cache

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Collate ``examples`` (dicts with ``image`` and ``label``) into model inputs; see the class docstring."""
        if not examples:
            raise ValueError("PatchCollator got an empty batch.")
        decoded, bad = [], []
        for offset, example in enumerate(examples):
            name = _describe(example.get("image"), self.num_seen + offset)
            label = self._check_label(example.get("label"), name)
            try:
                image = load_rgb_image(example["image"])
            except Exception as err:  # PIL raises many types (OSError, SyntaxError, ...) for a broken file
                warnings.warn(f"Skipping unreadable image {name}: {type(err).__name__}: {err}", BadImageWarning)
                bad.append(name)
                image = None
            decoded.append((image, label))
        self._record(len(examples), bad)
        good = [i for i, (image, _) in enumerate(decoded) if image is not None]
        if not good:  # evaluation only (training raised): score nothing, keep the batch's shape
            good, decoded[0] = [0], (Image.new("RGB", (8, 8), "white"), UNREADABLE)
        sources = [i if decoded[i][0] is not None else good[i % len(good)] for i in range(len(decoded))]
        crops, views = [], []
        with _preserved_global_rng():
            for slot, source in enumerate(sources):
                epoch = examples[source].get(EPOCH_KEY, self.epoch)  # a stream's examples carry their epoch
                if self.views:  # a fixed view per image: a filled slot repeats its source's crop exactly
                    views.append(epoch % self.views)
                    epoch, slot = f"view{views[-1]}", 0
                _seed_everything(self._sample_seed(examples[source]["image"], slot, epoch))
                crops.append(self.transform(decoded[source][0]))
        pixels = torch.stack(crops).float()
        labels = [decoded[source][1] for source in sources]
        if self.skip_bad_images:
            labels = [UNREADABLE if decoded[i][0] is None else label for i, label in enumerate(labels)]
        batch = {"pixel_values": self._normalise(pixels, self.student_norm)}
        if self.feature_cache is not None:
            chosen = [examples[source] for source in sources]
            batch.update(self.feature_cache.lookup(
                views, [example_key(example["image"]) for example in chosen],
                rows=[example.get(ROW_KEY) for example in chosen],
                names=[_describe(example["image"], self.num_seen + i) for i, example in enumerate(chosen)],
            ))
        elif self.teacher_norm is not None:
            batch["teacher_pixel_values"] = self._normalise(pixels, self.teacher_norm)
        batch["labels"] = torch.tensor(labels, dtype=torch.int64)
        return batch

    def _sample_seed(self, image: Any, slot: int, epoch: int | str) -> int:
        """A 63-bit seed from the run seed, the epoch, the image's identity and its slot in the batch."""
        digest = hashlib.blake2b(f"{self.seed}/{epoch}/{slot}/".encode(), digest_size=8)
        digest.update(_identity(image)[0])
        return int.from_bytes(digest.digest(), "little") >> 1

    @staticmethod
    def _normalise(pixels: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        mean, std = norm
        return (pixels - mean) / std

    def _check_label(self, label: Any, name: str) -> int:
        hint = "Check --label_column_name and that the label set matches the model's labels."
        if label is None or isinstance(label, bool) or not isinstance(label, (int, np.integer)):
            raise ValueError(f"The label of {name} is {label!r}, not a class id. {hint}")
        if self.num_labels is not None and not -1 <= int(label) < self.num_labels:  # -1: an unlabeled example
            raise ValueError(f"The label {int(label)} of {name} is outside range(0, {self.num_labels}) (or -1 for "
                             f"an unlabeled example). {hint}")
        return int(label)

    def _record(self, batch_size: int, bad: list[str]) -> None:
        """Count a batch; raise when it is all bad (training) or the bad fraction passes the threshold."""
        info = torch.utils.data.get_worker_info()
        row = 0 if info is None else 1 + info.id % (_COUNTER_ROWS - 1)
        self._counts[row] += torch.tensor([batch_size, len(bad)])
        self.bad_files.extend(bad)
        if len(bad) == batch_size and not self.skip_bad_images:
            raise ValueError(
                f"Every image of a batch of {batch_size} is unreadable: {bad[:10]}. Check that the image "
                "column holds encoded images (e.g. JPEG/PNG bytes or paths) and that the files are intact."
            )
        if self.num_seen >= self.min_samples_for_threshold:
            check_bad_fraction(self.num_bad, self.num_seen, self.max_bad_fraction, self.bad_files)


def _seed_everything(seed: int) -> None:
    """Seed torch's CPU generator (torchvision transforms, stain jitter), ``random`` (timm RandAugment) and numpy
    for one image.

    Not ``torch.manual_seed``: while CUDA is uninitialised (always so in DataLoader workers) it queues a re-seed of
    every GPU with a stack trace, 0.2-0.5 ms an image, a quarter of a 96 px image's augmentation; once CUDA is
    initialised it re-seeds the GPUs' generators, which `_preserved_global_rng` does not restore. The transforms
    draw on the CPU generator alone, so the draws are the same.
    """
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


@contextmanager
def _preserved_global_rng():
    """Leave the process's random states as they were: seeding per image must not touch dropout's draws."""
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.random.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])
