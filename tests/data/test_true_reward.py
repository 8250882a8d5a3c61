"""spec.data.trueReward: loaded by name with errors that name the field; values outside [0, 1] refused."""

from __future__ import annotations

import pytest

from kuberlhf.contract.spec import DataSpec
from kuberlhf.data.true_reward import load_true_reward, true_rewards


def test_loads_a_function_by_name_and_scores():
    fn = load_true_reward("posixpath:isabs")  # any importable (prompt, answer) -> number callable
    assert load_true_reward(None) is None
    assert true_rewards(lambda p, a: len(a) / 10, ["p", "q"], ["abc", ""]) == [0.3, 0.0]
    assert callable(fn)


@pytest.mark.parametrize(
    ("ref", "needle"),
    [("no_such_module_xyz:f", "cannot import module"), ("posixpath:no_such_function", "has no function")],
)
def test_bad_references_name_the_field(ref, needle):
    with pytest.raises(ValueError, match="spec.data.trueReward") as e:
        load_true_reward(ref)
    assert needle in str(e.value)


def test_out_of_range_values_are_refused():
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        true_rewards(lambda p, a: 2.0, ["p"], ["a"])


def test_spec_rejects_a_reference_without_a_function():
    with pytest.raises(ValueError):
        DataSpec(datasets=["kuberlhf/synthetic-pairs"], trueReward="just_a_module")
    assert DataSpec(datasets=["kuberlhf/synthetic-pairs"], trueReward="bench.tasks:style").true_reward
