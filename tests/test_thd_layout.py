"""The THD context-parallel partition (``parallel.context``) against a loop reference and, where it
imports, Transformer Engine's ``thd_get_partitioned_indices``."""
from __future__ import annotations

import pytest
import torch

from redi_megatron.parallel.context import check_thd_boundaries, global_order_index, thd_partition_index


def _reference(cu: list[int], cp: int, rank: int) -> list[int]:
    """Written from the definition: for each sequence, chunk ``rank`` then chunk ``2*cp-1-rank``."""
    out = []
    for start, end in zip(cu, cu[1:]):
        chunk = (end - start) // (2 * cp)
        for c in (rank, 2 * cp - 1 - rank):
            out += list(range(start + c * chunk, start + (c + 1) * chunk))
    return out


def _boundaries(seed: int, cp: int, count: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randint(1, 6, (count,), generator=g) * 2 * cp).tolist()
    return [0] + torch.tensor(lengths).cumsum(0).tolist()


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_partition_matches_the_definition_and_covers_the_row_once(cp, seed):
    cu = _boundaries(seed, cp, count=5)
    total = cu[-1]
    cu_t = torch.tensor(cu, dtype=torch.int32)
    parts = [thd_partition_index(cu_t, total, cp, r) for r in range(cp)]
    for r, part in enumerate(parts):
        assert part.tolist() == _reference(cu, cp, r)
    assert sorted(torch.cat(parts).tolist()) == list(range(total))
    order = global_order_index(cu_t, total, cp)
    assert torch.equal(order, torch.cat(parts))
    row = torch.arange(total) * 10
    gathered = torch.cat([row[p] for p in parts])          # what an all-gather of the local parts holds
    assert torch.equal(gathered[torch.argsort(order)], row)  # all_gather_cp's reordering restores the row


def test_single_sequence_row_is_the_classic_split():
    cu = torch.tensor([0, 16], dtype=torch.int32)
    assert thd_partition_index(cu, 16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert thd_partition_index(cu, 16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_bad_boundaries_are_refused():
    with pytest.raises(ValueError, match="divisible by 2\\*CP = 4"):
        check_thd_boundaries(torch.tensor([0, 6, 12]), 12, 2)
    with pytest.raises(ValueError, match="from 0 to the row length 16"):
        check_thd_boundaries(torch.tensor([0, 8, 12]), 16, 2)
    check_thd_boundaries(torch.tensor([0, 8, 16]), 16, 2)


def test_equals_transformer_engine_where_it_imports():
    tex = pytest.importorskip("transformer_engine_torch", reason="Transformer Engine is not importable here")
    if not torch.cuda.is_available():
        pytest.skip("TE's partition kernel needs CUDA")
    for cp in (2, 4):
        cu = _boundaries(3, cp, count=6)
        cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")
        for r in range(cp):
            te = tex.thd_get_partitioned_indices(cu_t, cu[-1], cp, r)
            assert te.tolist() == thd_partition_index(cu_t, cu[-1], cp, r).tolist()
