"""Worker for `tests/test_distributed.py::test_shuffle_bn_*`: one Shuffle-BN teacher forward on 2 processes.

Each rank builds the same BatchNorm network (seed 0), takes its own 4 real patches, runs
`moma_hf.modules.distributed.shuffled_forward` with BN on batch statistics, and writes its inputs, outputs and the
shared permutation to `<out>/rank<r>.safetensors`, so the test can recompute everything in one process.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import timm_classifier  # noqa: E402

import moma_hf.modules.distributed as distributed  # noqa: E402
from moma_hf.networks.backbones import pooled_features  # noqa: E402


def main():
    """Run one shuffled forward and save what the test needs."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--pixels", required=True, help="safetensors file with `pixel_values` (8, 3, H, W)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    accelerator = Accelerator()
    rank = accelerator.process_index
    torch.manual_seed(0)
    teacher = timm_classifier().eval()
    from safetensors.torch import load_file

    pixels = load_file(args.pixels)["pixel_values"][rank * 4:(rank + 1) * 4]
    drawn = []
    original = distributed.global_permutation

    def recorded(n, device):
        permutation = original(n, device)
        drawn.append(permutation)
        return permutation

    distributed.global_permutation = recorded
    with torch.no_grad(), distributed.batch_statistics(teacher):
        features, logits = distributed.shuffled_forward(lambda x: pooled_features(teacher, x), pixels)
    save_file({"inputs": pixels, "features": features, "logits": logits, "permutation": drawn[0],
               "world": torch.tensor(dist.get_world_size())}, str(Path(args.out) / f"rank{rank}.safetensors"))
    # Leave the process group together: see the end of _bad_image_launch_worker.py.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
