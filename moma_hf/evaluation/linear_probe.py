"""A linear probe: how well a frozen network's embedding separates the classes of a labeled patch dataset.

This answers "what is this teacher worth on my data?" before distilling from it, and measures a student the same way.
The protocol (``PROBE_PROTOCOL``, recorded beside every result; compare only numbers of the same protocol) follows
kaiko-ai's eva offline classification (a linear head on frozen embeddings, cross-entropy, AdamW, early stopping),
made self-contained and deterministic:

1. the embedding is ``moma_hf.networks.backbones.pooled_features(model, x)[0]`` of each image, one pass, eval mode;
2. a stratified ``probe_validation_fraction`` (20%) of the *training* split is held out (seeded), so the user's
   evaluation split is never looked at before the final score;
3. the features are standardized with the mean and (population) std of the remaining fitting part, a constant
   feature keeping scale 1 (as scikit-learn's ``StandardScaler``);
4. a zero-initialized ``nn.Linear`` is trained with cross-entropy and AdamW (learning rate 1e-3, weight decay 0.01;
   eva's 3e-4 is for raw features) on seeded mini-batch epochs of 256, for at most 12,500 optimizer steps (eva's);
5. after each epoch it is scored on the held-out part by balanced accuracy, ties broken by the lower held-out
   cross-entropy (on a small set the accuracy plateaus long before the head stops improving); training stops after
   ``probe_patience`` (7, eva's) epochs without improvement and the best head is kept;
6. that head scores the evaluation split: balanced accuracy (what eva reports), macro-F1, Cohen's kappa and accuracy,
   with the package's metrics (:func:`moma_hf.evaluation.metrics.prediction_metrics`).

The fit runs on one CPU thread, so two runs with the same settings and features give identical numbers on any machine.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..networks.backbones import pooled_features
from .metric_scripts import load_metric
from .metrics import prediction_metrics

logger = logging.getLogger(__name__)

# Bump when a default or a step of the protocol changes: numbers of different protocols are not comparable.
PROBE_PROTOCOL = "moma-linear-probe-v1"


@dataclass
class ProbeSettings:
    """The linear-probe protocol's settings (flags of `moma-probe`, and of the jobs that run a probe)."""

    probe_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the linear head."})
    probe_weight_decay: float = field(default=0.01, metadata={"help": "AdamW (decoupled) weight decay."})
    probe_batch_size: int = field(default=256, metadata={"help": "Embeddings per optimizer step."})
    probe_max_steps: int = field(default=12500, metadata={"help": "Most optimizer steps (eva's 12,500)."})
    probe_patience: int = field(
        default=7, metadata={"help": "Stop after this many epochs without a better held-out score (eva's 7)."})
    probe_validation_fraction: float = field(
        default=0.2, metadata={"help": "Share of each class of the training split held out for early stopping."})
    probe_seed: int = field(default=0, metadata={"help": "Seed of the held-out split and the mini-batch order."})

    def __post_init__(self):
        checks = {
            "probe_learning_rate": self.probe_learning_rate > 0,
            "probe_weight_decay": self.probe_weight_decay >= 0,
            "probe_batch_size": self.probe_batch_size >= 1,
            "probe_max_steps": self.probe_max_steps >= 1,
            "probe_patience": self.probe_patience >= 1,
            "probe_validation_fraction": 0 < self.probe_validation_fraction < 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            rules = "learning rate > 0, weight decay >= 0, batch size, max steps and patience >= 1, validation " \
                    "fraction strictly between 0 and 1"
            raise ValueError(f"Invalid probe settings {', '.join(f'--{n}={getattr(self, n)}' for n in bad)}: {rules}.")


@dataclass
class ProbeFit:
    """A fitted probe: the standardization and the best linear head, and how the fit went.

    Attributes:
        head: `nn.Linear(d, C)` on standardized features.
        mean, std: `(d,)` standardization of the fitting part.
        best_epoch, epochs: the epoch whose head was kept, and the epochs run.
        validation_balanced_accuracy: the kept head's balanced accuracy on the held-out part.
        train_images, validation_images: sizes of the fitting and held-out parts of the training split.
    """

    head: nn.Linear
    mean: torch.Tensor
    std: torch.Tensor
    best_epoch: int
    epochs: int
    validation_balanced_accuracy: float
    train_images: int
    validation_images: int

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """`(N, C)` logits of raw `(N, d)` features."""
        return self.head((features.float() - self.mean) / self.std)

    def predict(self, features: torch.Tensor) -> np.ndarray:
        """`(N,)` predicted class ids of raw `(N, d)` features."""
        return self.logits(features).argmax(dim=-1).numpy()


@torch.no_grad()
def extract_embeddings(model: nn.Module, loader, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of `model` (already on `device`) over `loader`, in eval mode: `(features (N, d) float32 on CPU,
    labels (N,) long)`.

    Batches are the package collators' dicts (`pixel_values (B, 3, H, W)`, `labels (B,)`); images the collator
    could not read (negative label) are left out. The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype  # a bf16 teacher takes bf16 pixels
    features, labels, skipped = [], [], 0
    try:
        for batch in loader:
            keep = batch["labels"] >= 0
            skipped += int((~keep).sum())
            if keep.any():
                pixels = batch["pixel_values"][keep].to(device, dtype=dtype, non_blocking=True)
                features.append(pooled_features(model, pixels)[0].float().cpu())
                labels.append(batch["labels"][keep].long())
    finally:
        model.train(was_training)
    if skipped:
        logger.warning("The probe left out %d unreadable image(s).", skipped)
    if not features:
        raise ValueError("No readable labeled image to embed: the split is empty or every image failed to load.")
    return torch.cat(features), torch.cat(labels)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(fit indices, held-out indices)`, sorted: about `fraction` of each class held out, always keeping at least
    one example of the class for fitting. Seeded: the same labels and seed give the same split."""
    generator = torch.Generator().manual_seed(seed)
    held_out = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        count = min(int(fraction * len(members) + 0.5), len(members) - 1)
        held_out.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held_out = torch.sort(torch.cat(held_out)).values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    if not len(held_out):
        raise ValueError(f"The training split ({len(labels)} images) is too small to hold out "
                         f"{fraction:.0%} of a class for early stopping: give more training images.")
    return torch.nonzero(mask).flatten(), held_out


def standardization(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(mean (d,), std (d,))` of `(N, d)` features; a constant feature gets std 1 (as `StandardScaler`)."""
    mean, std = features.mean(dim=0), features.std(dim=0, unbiased=False)
    return mean, torch.where(std > 0, std, torch.ones_like(std))


@contextmanager
def _one_thread():
    """Run torch on one CPU thread: a linear head's matmuls are too small for threads to pay off (on a busy machine
    they cost 20x), and one thread makes the sums' order, hence the numbers, the same on every machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fit_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, num_labels: int,
                     settings: ProbeSettings) -> ProbeFit:
    """Fit the probe's head on `(N, d)` training features and `(N,)` labels (steps 2-5 of the protocol)."""
    with _one_thread():
        return _fit(train_x, train_y, num_labels, settings)


def _fit(train_x: torch.Tensor, train_y: torch.Tensor, num_labels: int, settings: ProbeSettings) -> ProbeFit:
    fit_idx, val_idx = stratified_split(train_y, settings.probe_validation_fraction, settings.probe_seed)
    mean, std = standardization(train_x[fit_idx].float())
    x, y = (train_x[fit_idx].float() - mean) / std, train_y[fit_idx]
    val_x, val_y = (train_x[val_idx].float() - mean) / std, train_y[val_idx]
    # Logistic regression is convex: a zero start needs no random draw (and leaves the caller's RNG streams alone).
    head = torch.nn.utils.skip_init(nn.Linear, x.shape[1], num_labels)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.probe_learning_rate,
                                  weight_decay=settings.probe_weight_decay)
    generator = torch.Generator().manual_seed(settings.probe_seed)
    best, best_head, best_epoch, stale, steps, epoch = None, None, 0, 0, 0, 0
    while steps < settings.probe_max_steps and stale < settings.probe_patience:
        epoch += 1
        for batch in torch.randperm(len(y), generator=generator).split(settings.probe_batch_size):
            loss = F.cross_entropy(head(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == settings.probe_max_steps:
                break
        score = _validation_score(head, val_x, val_y)
        if best is None or score > best:
            best, best_head, best_epoch, stale = score, copy.deepcopy(head), epoch, 0
        else:
            stale += 1
    logger.info("Probe: best held-out balanced accuracy %.4f at epoch %d of %d (%d steps).",
                best[0], best_epoch, epoch, steps)
    return ProbeFit(head=best_head.requires_grad_(False), mean=mean, std=std, best_epoch=best_epoch, epochs=epoch,
                    validation_balanced_accuracy=best[0], train_images=len(fit_idx), validation_images=len(val_idx))


@torch.no_grad()
def _validation_score(head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """`(balanced accuracy, -cross-entropy)` on the held-out part: larger is better, compared in that order."""
    logits = head(x)
    predictions = logits.argmax(dim=-1).numpy()
    accuracy = load_metric("balanced_accuracy").compute(predictions=predictions, references=y.numpy())
    return accuracy["balanced_accuracy"], -F.cross_entropy(logits, y).item()


def probe_scores(fit: ProbeFit, eval_x: torch.Tensor, eval_y: torch.Tensor) -> dict[str, float]:
    """`prediction_metrics` (accuracy, balanced_accuracy, macro_f1, cohen_kappa, quadratic_kappa) of the fitted
    probe on `(N, d)` evaluation features and `(N,)` labels."""
    return prediction_metrics(fit.predict(eval_x), eval_y.numpy())


def run_linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, eval_x: torch.Tensor, eval_y: torch.Tensor,
                     num_labels: int, settings: ProbeSettings) -> dict:
    """Fit the probe on the training features and score it on the evaluation features.

    Returns the :func:`probe_scores` and the fit: `best_epoch`, `epochs`, `validation_balanced_accuracy`,
    `train_images`, `validation_images` (the parts of the training split) and `eval_images`.
    """
    if train_x.shape[1] != eval_x.shape[1]:
        raise ValueError(f"Training features are {train_x.shape[1]}-d but evaluation features {eval_x.shape[1]}-d.")
    with _one_thread():
        fit = _fit(train_x, train_y, num_labels, settings)
        scores = probe_scores(fit, eval_x, eval_y)
    return {**scores, "best_epoch": fit.best_epoch, "epochs": fit.epochs,
            "validation_balanced_accuracy": fit.validation_balanced_accuracy, "train_images": fit.train_images,
            "validation_images": fit.validation_images, "eval_images": len(eval_y)}
