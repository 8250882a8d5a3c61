"""DeepSpeed-Chat's data_split semantics: seeded, disjoint, covering, and the same on every rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kuberlhf.data import split_indices
from kuberlhf.data.splits import eval_count, split_bounds


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10, 97, 1000])
@pytest.mark.parametrize("weights", [(2, 4, 4), (1, 0, 0), (0, 0, 1), (1, 1, 1), (0.5, 0.25, 0.25)])
def test_disjoint_and_covering(n: int, weights: tuple[float, float, float]) -> None:
    parts = split_indices(n, weights, seed=1234, key="ds")
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(n))  # covering, and no index twice (disjoint)


def test_sizes_follow_cumulative_weights() -> None:
    assert [len(p) for p in split_indices(10, (2, 4, 4), 1, "k")] == [2, 4, 4]
    assert [len(p) for p in split_indices(1000, (2, 4, 4), 1, "k")] == [200, 400, 400]
    assert split_bounds(7, (1, 1, 1)) == [0, 2, 5, 7]  # round(7/3)=2, round(14/3)=5
    assert [len(p) for p in split_indices(50, (1, 0, 0), 1, "k")] == [50, 0, 0]


def test_same_seed_repeats_and_other_seeds_differ() -> None:
    a = split_indices(500, (2, 4, 4), seed=1234, key="Dahoas/rm-static")
    assert a == split_indices(500, (2, 4, 4), seed=1234, key="Dahoas/rm-static")
    assert a != split_indices(500, (2, 4, 4), seed=1235, key="Dahoas/rm-static")
    # The key (dataset) also changes the shuffle, so two same-sized datasets are not split alike.
    assert a != split_indices(500, (2, 4, 4), seed=1234, key="other")


def test_split_is_a_shuffle_not_a_head_cut() -> None:
    sft, _, _ = split_indices(1000, (2, 4, 4), seed=7, key="k")
    assert sorted(sft) != list(range(200))


def test_pinned_values() -> None:
    """The partition is part of the experiment's identity (which rows each stage saw): pin it."""
    assert split_indices(10, (2, 4, 4), seed=1234, key="kuberlhf/synthetic-pairs") == \
        split_indices(10, (0.2, 0.4, 0.4), seed=1234, key="kuberlhf/synthetic-pairs")
    parts = split_indices(10, (2, 4, 4), seed=1234, key="pinned")
    assert parts == PINNED, parts


PINNED = ([9, 8], [0, 4, 2, 7], [6, 1, 5, 3])


def test_independent_of_rank_and_world_size() -> None:
    """Each rank of each node computes its stage's slice alone: the answer must not depend on the process."""
    code = ("import json; from kuberlhf.data import split_indices; "
            "print(json.dumps(split_indices(301, (2, 4, 4), 99, 'k')))")
    results = []
    for rank, world in ((1, 2), (7, 16)):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank % 2), "WORLD_SIZE": str(world),
               "NODE_RANK": str(rank // 2), "PYTHONHASHSEED": str(rank + 11)}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                             check=True).stdout
        results.append(json.loads(out))
    assert all(r == results[0] for r in results)
    assert [list(p) for p in split_indices(301, (2, 4, 4), 99, "k")] == results[0]


def test_eval_count() -> None:
    assert eval_count(100, 0.1) == 10
    assert eval_count(5, 0.1) == 1  # at least one eval row when asked for
    assert eval_count(1, 0.5) == 0  # never the only row
    assert eval_count(10, 0.0) == 0
    assert eval_count(2, 0.99) == 1  # never all rows


def test_bad_weights() -> None:
    with pytest.raises(ValueError, match="three weights"):
        split_indices(10, (1, 1), 1, "k")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-negative"):
        split_indices(10, (0, 0, 0), 1, "k")
