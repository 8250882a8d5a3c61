"""The cross-field rules table (kuberlhf.contract.rules): kuberlhf's own checks (the models, then the preflight)
reject each bad spec of harness.rule_cases with exactly that rule's text and accept every example, and the CRD
carries the same rules as CEL. The API servers' half of the same cases is tests/e2e/test_crd_servers.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from harness.rule_cases import CASES, VALID, messages_in

from kuberlhf.contract.preflight import preflight
from kuberlhf.contract.rules import RULES, TRANSITION_RULES, update_problems
from kuberlhf.contract.spec import SpecError, parse_pipeline
from kuberlhf_operator.crd import build_crd

REPO = Path(__file__).resolve().parents[2]


def own_messages(doc: dict) -> set[str]:
    """What the operator's reconcile and `kuberlhf run` report for ``doc``: the models' errors, else the
    preflight's problems, reduced to the rule texts they contain."""
    try:
        spec = parse_pipeline(doc).spec
    except SpecError as e:
        return messages_in(str(e))
    return messages_in("\n".join(str(p) for p in preflight(spec)))


def test_every_rule_has_a_case_and_its_own_text() -> None:
    assert {rule.text for _, rule in CASES} == {r.text for r in RULES}
    assert len({r.text for r in (*RULES, *TRANSITION_RULES)}) == len(RULES) + len(TRANSITION_RULES)


def test_valid_spec_and_examples_pass() -> None:
    assert own_messages(VALID) == set() and not preflight(parse_pipeline(VALID).spec)
    for f in sorted((REPO / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            if doc and doc.get("kind") == "RLHFPipeline":
                assert not [p for p in preflight(parse_pipeline(doc).spec) if messages_in(str(p))], f.name


@pytest.mark.parametrize(("patch", "split"), [
    ({"algorithm": "dpo", "reward": None}, "2,8,0"),  # dpo trains on step 2's pairs: no step-3 share needed
    ({"algorithm": "grpo", "reward": None, "stages": {"grpo": {"rewardFunction": "rewards:score"}}}, "2,0,8"),
    ({"algorithm": "grpo"}, "2,4,4"),
])
def test_each_algorithm_needs_only_its_own_stages_shares(patch, split) -> None:
    from harness.rule_cases import Case

    doc = Case("split", {**patch, "data": {"split": split}}).doc()
    assert own_messages(doc) == set(), split


@pytest.mark.parametrize(("case", "rule"), CASES, ids=[c.name for c, _ in CASES])
def test_own_checks_reject_with_the_rule_text(case, rule) -> None:
    assert own_messages(case.doc()) == {rule.text}


def test_storage_rule_judges_an_update_after_the_start() -> None:
    old = copy.deepcopy(VALID)
    new = copy.deepcopy(VALID)
    new["spec"]["storage"] = {"uri": "s3://other/prefix"}
    assert update_problems(new, old) == []  # not started: storage may still change
    old["status"] = {"stages": {"sft": {"phase": "Running", "startTime": "2026-12-01T00:00:00Z"}}}
    assert [r.field for r in update_problems(new, old)] == ["spec.storage"]
    assert update_problems(old, old) == []


def test_crd_carries_every_cel_rule_once_and_the_pre_125_variant_none() -> None:
    def rules_in(node: object) -> list[dict]:
        if isinstance(node, dict):
            return list(node.get("x-kubernetes-validations", [])) + [r for v in node.values() for r in rules_in(v)]
        if isinstance(node, list):
            return [r for v in node for r in rules_in(v)]
        return []

    in_crd = rules_in(build_crd())
    assert sorted(r["message"] for r in in_crd) == sorted(r.text for r in (*RULES, *TRANSITION_RULES) if r.cel)
    assert not rules_in(build_crd(cel=False))
