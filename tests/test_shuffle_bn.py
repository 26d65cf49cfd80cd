"""Shuffle-BN on 2 real processes equals an independent one-process recomputation from the same permutation."""

import pytest
import torch
from conftest import REPO, launch_two_processes, timm_classifier
from safetensors.torch import load_file, save_file

from moma_hf.modules.distributed import batch_statistics
from moma_hf.networks.backbones import pooled_features


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
@pytest.mark.slow
def test_shuffle_bn_gives_each_process_its_own_samples_computed_with_other_samples_statistics(nct_tensors,
                                                                                              tmp_path):
    pixels = nct_tensors[0][::16][:8].contiguous()  # 8 real patches of different tissues
    save_file({"pixel_values": pixels}, str(tmp_path / "pixels.safetensors"))
    launch_two_processes(REPO / "tests" / "_shuffle_bn_worker.py", "--pixels", tmp_path / "pixels.safetensors",
                         "--out", tmp_path)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert [int(r["world"]) for r in ranks] == [2, 2]
    permutation = ranks[0]["permutation"]
    assert torch.equal(permutation, ranks[1]["permutation"]) and sorted(permutation.tolist()) == list(range(8))
    assert torch.equal(torch.cat([r["inputs"] for r in ranks]), pixels)

    torch.manual_seed(0)
    teacher = timm_classifier().eval()  # the workers' network, built from the same seed
    shuffled = pixels[permutation]
    with torch.no_grad(), batch_statistics(teacher):
        shards = [pooled_features(teacher, shard) for shard in shuffled.chunk(2)]
        own_batches = [pooled_features(teacher, batch)[0] for batch in pixels.chunk(2)]
    features = torch.cat([f for f, _ in shards])[torch.argsort(permutation)]
    logits = torch.cat([z for _, z in shards])[torch.argsort(permutation)]
    torch.testing.assert_close(torch.cat([r["features"] for r in ranks]), features)
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), logits)
    # Batch statistics matter here: had the shuffle not happened, the features would be these instead.
    if not torch.equal(permutation[:4].sort().values, torch.arange(4)):
        assert not torch.allclose(torch.cat(own_batches), features, atol=1e-4)


def test_shuffle_bn_is_refused_for_a_frozen_teacher(small_moma):
    with pytest.raises(ValueError, match="shuffle_bn applies to momentum teachers only"):
        small_moma(teacher_update="frozen", shuffle_bn=True)
