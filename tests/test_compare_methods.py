"""The comparison harness: paired subsets, and the paired statistics against a hand computation."""

import pytest

from moma_hf.commands import compare


def test_subsets_are_stratified_seeded_and_shared_by_every_method(crc_polyp_dir, tmp_path):
    files = compare.list_images(crc_polyp_dir / "test")
    first, rest = compare.stratified_split(files, 0.01, seed=3)
    again, _ = compare.stratified_split(files, 0.01, seed=3)
    other, _ = compare.stratified_split(files, 0.01, seed=4)
    assert first == again and first != other  # one draw per seed, the same whichever method asks
    assert {k: len(v) for k, v in first.items()} == {"AC": 10, "H": 10, "S": 5, "T": 6, "V": 6}
    assert all(not set(first[k]) & set(rest[k]) and len(first[k]) + len(rest[k]) == len(files[k]) for k in files)
    folder = compare.link_subset(first, tmp_path / "coarse", {"S": "ADENOMA", "T": "ADENOMA", "V": "ADENOMA"})
    assert sorted(p.name for p in folder.iterdir()) == ["AC", "ADENOMA", "H"]
    assert len(list((folder / "ADENOMA").iterdir())) == 17


def test_the_table_reports_means_and_the_paired_difference_to_ce_with_a_t_interval(tmp_path):
    ce = [0.50, 0.60, 0.55]
    moma = [0.56, 0.63, 0.62]
    rows = [{"method": m, "seed": s, "accuracy": v, "macro_f1": v, "balanced_accuracy": v}
            for m, values in (("ce", ce), ("moma", moma)) for s, v in enumerate(values)]
    table = compare.summarise(rows, ["ce", "moma"], tmp_path, "test")
    # Differences 6, 3, 7 points: mean 5.333, sample std 2.082, t(0.975, 2) = 4.303 -> half-width 5.172.
    assert "| moma | 60.3 ± 3.8 |" in table
    assert "+5.3 [+0.2, +10.5]" in table
    assert compare.t_quantile(2) == pytest.approx(4.3027, abs=1e-4)
    assert (tmp_path / "results.png").stat().st_size > 0
