"""Why does MoMA with batch attention trail its no-attention ablation? Measure what attention does to the embeddings.

Distils each variant asked for with `moma_hf.commands.compare.run_method` (the `moma-distill` job, in this process)
on one scenario of `moma-compare` (same labeled subset, teacher and seed), and records at every training step:

- `key_cos_in` / `key_cos_out`: mean cosine between different samples' keys before (`g_T`) and after `A_k`;
- `query_cos_in` / `query_cos_out`: the same for the queries around `A_q`;
- `positive`: mean `q . k` of a sample with its own key; `negative`: mean `q . queue`;
- `loss_moma`.

A batch attention whose outputs all point the same way (cosines near 1) leaves InfoNCE only the small
part of each embedding that differs between samples. Writes `steps.csv` per variant and `summary.md`.

    python benchmarks/diagnose_attention.py --config examples/configs/scenario_same_task.yaml --seed 0 \
        --variants moma moma-noattn "moma --w_kd 0" "moma-noattn --w_kd 0"
"""

from __future__ import annotations

import argparse
import csv
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.nn.modules.module import register_module_forward_hook

from moma_hf import MoMAForDistillation
from moma_hf.commands import compare as cm

REPO = Path(__file__).resolve().parents[1]

STATS = ("key_cos_in", "key_cos_out", "query_cos_in", "query_cos_out", "positive", "negative", "loss_moma")


def mean_pairwise_cosine(rows: torch.Tensor) -> float:
    """Mean cosine between different rows of `(B, D)`."""
    unit = F.normalize(rows.detach().float(), dim=-1)
    gram = unit @ unit.T
    count = rows.shape[0]
    return float((gram.sum() - gram.diagonal().sum()) / (count * (count - 1)))


class EmbeddingRecorder:
    """Records `STATS` for every training forward of any `MoMAForDistillation` built while it is installed."""

    def __init__(self):
        self.steps: list[dict[str, float]] = []
        self._current: dict[str, torch.Tensor] = {}
        self._instrumented: set[int] = set()
        self._handle = register_module_forward_hook(self._on_forward)

    def _keep(self, name):
        def hook(module, inputs, output):
            if module.training:
                self._current[name + "_in"], self._current[name + "_out"] = inputs[0], output
        return hook

    def _on_forward(self, module, inputs, output):
        if not isinstance(module, MoMAForDistillation) or not module.training:
            return
        if id(module) not in self._instrumented:  # first step: attach to its attention modules from now on
            self._instrumented.add(id(module))
            module.query_attention.register_forward_hook(self._keep("query"))
            module.key_attention.register_forward_hook(self._keep("key"))
            return
        c = self._current
        queue = module.key_queue.queue[module.key_queue.valid_mask()]
        query = F.normalize(c["query_out"].float(), dim=-1)
        self.steps.append({
            "key_cos_in": mean_pairwise_cosine(c["key_in"]), "key_cos_out": mean_pairwise_cosine(c["key_out"]),
            "query_cos_in": mean_pairwise_cosine(c["query_in"]),
            "query_cos_out": mean_pairwise_cosine(c["query_out"]),
            "positive": float((query * output.contrastive_keys).sum(-1).mean()),
            "negative": float((query @ queue.T).mean()) if len(queue) else float("nan"),
            "loss_moma": float(output.loss_moma),
        })

    def close(self):
        self._handle.remove()


def run_variant(variant: str, seed: int, config: dict, dirs: tuple[str, Path, Path],
                out: Path) -> tuple[list[dict], dict]:
    """Distil one variant ("method [--flag value ...]") as `moma-compare` would, on `dirs` = (teacher,
    labeled training folder, test folder); its per-step statistics and test metrics."""
    teacher, train_dir, test_dir = dirs
    shutil.rmtree(out, ignore_errors=True)  # the harness skips finished runs; this one must train to record
    recorder = EmbeddingRecorder()
    try:
        metrics = cm.run_method(variant, seed, train_dir, test_dir, teacher, config, out)
    finally:
        recorder.close()
    with open(out / "steps.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=STATS)
        writer.writeheader()
        writer.writerows(recorder.steps)
    return recorder.steps, metrics


def main(argv=None) -> str:
    """Run every variant and write `summary.md`: statistics over the first and last fifth of the steps."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=["moma", "moma-noattn"])
    parser.add_argument("--output_dir", type=Path)
    args = parser.parse_args(argv)
    config = yaml.safe_load(args.config.read_text())
    out = args.output_dir or REPO / "outputs" / "diagnose" / f"{args.config.stem}_seed{args.seed}"
    compare_out = REPO / "outputs" / "compare" / args.config.stem  # reuses the harness's teacher and subsets
    teacher, test_dir, pool = cm.prepare_scenario(config, compare_out)
    dirs = (teacher, cm.labeled_subset(pool, config, args.seed, compare_out), test_dir)
    lines = ["| variant | steps | " + " | ".join(STATS) + " | macro_f1 |",
             "| --- | --- |" + " --- |" * (len(STATS) + 1)]
    for variant in args.variants:
        steps, metrics = run_variant(variant, args.seed, config, dirs, out / cm.variant_dir(variant))
        fifth = max(1, len(steps) // 5)
        for label, part in (("first 1/5", steps[:fifth]), ("last 1/5", steps[-fifth:])):
            cells = [f"{np.nanmean([s[k] for s in part]):.3f}" for k in STATS]
            lines.append(f"| {variant} | {label} | " + " | ".join(cells) + f" | {100 * metrics['macro_f1']:.1f} |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table)
    print(table)
    return table


if __name__ == "__main__":
    main()
