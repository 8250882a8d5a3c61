"""DPO's numbers (kuberlhf.rlhf.dpo) against the formula written out here, independently: hand-computed losses,
the label-smoothing limits, the divergence mask of a pair, and a tiny model whose policy equals its reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from kuberlhf.rlhf.dpo import DPOSettings, DPOTrainer, divergence_mask, dpo_loss, sequence_logps


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def reference_loss(pc: float, pr: float, rc: float, rr: float, beta: float, eps: float) -> float:
    """DeepSpeed-Chat step2_dpo: -logsigmoid(z)(1 - eps) - logsigmoid(-z) eps, z = beta((pc - rc) - (pr - rr));
    -logsigmoid(z) = softplus(-z)."""
    z = beta * ((pc - rc) - (pr - rr))
    return (1 - eps) * softplus(-z) + eps * softplus(z)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_hand_computed_loss_and_rewards() -> None:
    # z = 0.1 * ((-1 + 1.5) - (-2 + 1.5)) = 0.1; -log sigmoid(0.1) = log(1 + e^-0.1) = 0.6443967...
    loss, chosen, rejected = dpo_loss(t(-1.0), t(-2.0), t(-1.5), t(-1.5), beta=0.1)
    assert float(loss) == pytest.approx(0.6443967, abs=1e-6)
    assert float(chosen) == pytest.approx(0.05) and float(rejected) == pytest.approx(-0.05)
    # a batch is the mean of its pairs; the second pair prefers the rejected answer (z = -0.5)
    loss2, _, _ = dpo_loss(t(-1.0, -3.0), t(-2.0, -1.0), t(-1.5, -2.0), t(-1.5, -1.5), beta=0.5)
    expected = (reference_loss(-1, -2, -1.5, -1.5, 0.5, 0) + reference_loss(-3, -1, -2, -1.5, 0.5, 0)) / 2
    assert float(loss2) == pytest.approx(expected, abs=1e-9)
    assert reference_loss(-3, -1, -2, -1.5, 0.5, 0) == pytest.approx(softplus(0.75))  # z = 0.5*(-1 - 0.5)


def test_label_smoothing_limits() -> None:
    pc, pr, rc, rr = t(-1.0), t(-2.0), t(-1.5), t(-1.5)
    # eps = 0 is plain DPO; eps = 0.25 mixes the two directions: 0.75 * 0.6443967 + 0.25 * 0.7443967
    assert float(dpo_loss(pc, pr, rc, rr, 0.1, 0.0)[0]) == pytest.approx(softplus(-0.1))
    assert float(dpo_loss(pc, pr, rc, rr, 0.1, 0.25)[0]) == pytest.approx(0.6693967, abs=1e-6)
    # eps = 0.5: the labels carry no information, the loss no longer depends on which answer is chosen
    assert float(dpo_loss(pc, pr, rc, rr, 0.1, 0.5)[0]) == pytest.approx(float(dpo_loss(pr, pc, rr, rc, 0.1, 0.5)[0]))
    # swapping chosen and rejected is the same as smoothing 1 - eps
    assert float(dpo_loss(pr, pc, rr, rc, 0.1, 0.2)[0]) == pytest.approx(float(dpo_loss(pc, pr, rc, rr, 0.1, 0.8)[0]))
    # and the smoothed gradient pushes the margin less: d loss / d pc = beta (eps - sigmoid(-z))
    for eps in (0.0, 0.1, 0.3):
        x = t(-1.0).requires_grad_()
        dpo_loss(x, pr, rc, rr, 0.1, eps)[0].backward()
        assert float(x.grad) == pytest.approx(0.1 * (eps - 1 / (1 + math.exp(0.1))), abs=1e-9)


def test_divergence_mask_drops_the_shared_prefix_and_padding() -> None:
    ids = torch.tensor([[5, 6, 7, 8, 0], [3, 3, 3, 0, 0],   # chosen rows
                        [5, 6, 9, 0, 0], [3, 3, 3, 0, 0]])  # rejected rows (the second pair is identical)
    attn = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    assert divergence_mask(ids, attn).tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 0, 0], [1, 1, 1, 0, 0]]


def test_sequence_logps_sums_the_masked_next_token_logprobs() -> None:
    logits = torch.zeros(1, 4, 3)  # uniform over 3 tokens: each next-token log-prob is -ln 3
    logits[0, 1, 2] = math.log(2.0)  # position 1 predicts token 2 with probability 2/4
    ids = torch.tensor([[0, 1, 2, 1]])
    mask = torch.tensor([[0, 1, 1, 0]])  # tokens 1 and 2 count; the last token is padding
    assert float(sequence_logps(logits, ids, mask)) == pytest.approx(-math.log(3) + math.log(0.5))


def test_policy_equal_to_reference_starts_at_log_two_and_learns_the_preference() -> None:
    from kuberlhf.models.tiny import tiny_causal_lm

    policy = tiny_causal_lm(seed=0, dropout=0.0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    ids = torch.tensor([[4, 5, 6, 7], [4, 5, 9, 10]])  # one pair: chosen row, rejected row
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    trainer = DPOTrainer(policy, reference, DPOSettings(beta=0.5))
    loss, stats = trainer.loss(batch)
    assert float(loss.detach()) == pytest.approx(math.log(2), abs=1e-6) and stats["margin"] == pytest.approx(0, abs=1e-6)
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        trainer.loss(batch)[0].backward()
        opt.step()
    loss, stats = trainer.loss(batch)
    assert float(loss.detach()) < math.log(2) - 0.01 and stats["margin"] > 0 and stats["reward_accuracy"] == 1.0


def test_rpo_adds_the_chosen_answers_nll_per_scored_token() -> None:
    """RPO (Pang et al. 2024): loss = DPO + alpha * (-sum of the chosen row's scored log-probs / their count),
    computed here from the model's own logits by hand; alpha 0 is plain DPO."""
    import torch.nn.functional as F

    from kuberlhf.models.tiny import tiny_causal_lm

    policy = tiny_causal_lm(seed=0, dropout=0.0)
    reference = copy.deepcopy(policy).requires_grad_(False)
    ids = torch.tensor([[4, 5, 6, 7, 8], [4, 5, 9, 10, 0]])  # chosen: 3 tokens after the shared prefix 4 5
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    batch = {"input_ids": ids, "attention_mask": attn}
    plain, _ = DPOTrainer(policy, reference, DPOSettings(beta=0.5)).loss(batch)
    loss, stats = DPOTrainer(policy, reference, DPOSettings(beta=0.5, rpo_alpha=2.0)).loss(batch)
    logp = F.log_softmax(policy(input_ids=ids[:1]).logits[0].double(), dim=-1)
    nll = -sum(float(logp[pos - 1, ids[0, pos]]) for pos in (2, 3, 4)) / 3  # tokens 6, 7, 8
    assert stats["chosen_nll"] == pytest.approx(nll, abs=1e-5)
    assert float(loss) == pytest.approx(float(plain) + 2.0 * nll, abs=1e-5)
    assert "chosen_nll" not in DPOTrainer(policy, reference, DPOSettings(beta=0.5)).loss(batch)[1]
