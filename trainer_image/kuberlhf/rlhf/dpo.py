"""Direct preference optimisation (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model") as DeepSpeed-Chat's ``training/step2_dpo_finetuning/main.py`` computes it:

- each (chosen, rejected) pair is scored by the summed log-probability of its tokens from the first position where
  the two sequences differ (the shared prompt does not count), under the trained policy and a frozen reference
  (the SFT model);
- ``logits = beta * ((pi_c - ref_c) - (pi_r - ref_r))``;
- ``loss = mean(-logsigmoid(logits) * (1 - label_smoothing) - logsigmoid(-logits) * label_smoothing)``: with
  ``label_smoothing`` eps the pair is taken as mislabelled with probability eps (conservative DPO);
- with ``rpo_alpha`` a > 0 (RPO: Pang et al. 2024, "Iterative Reasoning Preference Optimization"; TRL's
  ``rpo_alpha``), ``loss += a * NLL``, the chosen rows' negative log-likelihood per token over the same scored
  tokens: DPO's loss asks only for the margin and can lower the chosen answers' likelihood together with the
  rejected ones (bench/RESULTS.md section 7); the NLL term holds the chosen ones up. Pang et al. score the whole
  answer; here it is the tokens from where the pair differs (the pair batch does not carry the prompt's length),
  which is the whole answer when the two answers differ from their first token;
- the implicit rewards ``beta * (pi - ref)`` of the chosen and rejected answers are reported, and the share of
  pairs where the chosen one's is higher (``reward_accuracy``).

One difference from DeepSpeed-Chat: the token mask is the attention mask, not ``input_ids != pad_token_id``, so a
model whose pad token is its EOS (GPT-2) still counts its EOS. Batches are laid out like step 2's: the B chosen
rows, then the B rejected rows, right-padded to one length (``kuberlhf.data.tokenized.pair_collate``).

:class:`DPOTrainer` is the Python API next to ``PPOTrainer``: ``loss(batch)`` for a loop that steps itself (the dpo
stage's), ``train_step(batch)`` for one backward + optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kuberlhf.contract.spec import DPOStageSpec, spec_default
from kuberlhf.rlhf.ppo_math import token_logprobs


def divergence_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The tokens that score a pair batch (2B, L): the attention mask, zeroed before the first position where a
    pair's chosen and rejected rows differ (both rows of the pair). Identical rows keep every token (DeepSpeed-
    Chat's divergence index 0)."""
    half = input_ids.shape[0] // 2
    chosen, rejected = input_ids[:half], input_ids[half:]
    differs = chosen != rejected
    any_diff = differs.any(dim=1)
    first = torch.where(any_diff, differs.long().argmax(dim=1), torch.zeros_like(any_diff, dtype=torch.long))
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    keep = (positions >= first.unsqueeze(1)).long()
    return attention_mask.long() * torch.cat([keep, keep], dim=0)


def masked_token_logps(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """``log p(token_t | tokens_<t)`` where ``label_mask[t]`` is 1, else 0: (N, L, V) -> (N, L-1)."""
    return token_logprobs(logits, input_ids) * label_mask[:, 1:].to(torch.float32)


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Sum over each row of ``log p(token_t | tokens_<t)`` where ``label_mask[t]`` is 1: (N, L, V) -> (N,)."""
    return masked_token_logps(logits, input_ids, label_mask).sum(dim=-1)


def chosen_nll(token_logps: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood per scored token of the chosen rows (the first half of a pair batch): token
    log-probs (2B, L-1), already masked (``masked_token_logps``), and the label mask (2B, L) -> a scalar."""
    half = token_logps.shape[0] // 2
    return -token_logps[:half].sum() / label_mask[:half, 1:].sum().clamp(min=1).to(token_logps.dtype)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, chosen rewards, rejected rewards) of a batch of pairs, from the summed log-probs (B,) each."""
    logits = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    chosen_rewards = beta * (policy_chosen - ref_chosen).detach()
    rejected_rewards = beta * (policy_rejected - ref_rejected).detach()
    return losses.mean(), chosen_rewards, rejected_rewards


@dataclass
class DPOSettings:
    """DPO's constants; every default is ``spec.stages.dpo``'s."""

    beta: float = spec_default(DPOStageSpec, "beta")
    label_smoothing: float = spec_default(DPOStageSpec, "label_smoothing")
    rpo_alpha: float = spec_default(DPOStageSpec, "rpo_alpha")

    @classmethod
    def from_spec(cls, st: Any) -> DPOSettings:
        return cls(beta=st.beta, label_smoothing=st.label_smoothing, rpo_alpha=st.rpo_alpha)


class DPOTrainer:
    """``policy``: the trained DeepSpeed engine (or module) of the SFT model; ``reference``: a frozen copy."""

    def __init__(self, policy: Any, reference: Any, settings: DPOSettings | None = None):
        self.policy, self.reference = policy, reference
        self.s = settings or DPOSettings()

    @staticmethod
    def _token_logps(model: Any, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return masked_token_logps(out.logits, batch["input_ids"], mask)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """The DPO loss of a pair batch (to backpropagate) and its statistics."""
        mask = divergence_mask(batch["input_ids"], batch["attention_mask"])
        tokens = self._token_logps(self.policy, batch, mask)
        pi_c, pi_r = tokens.sum(dim=-1).chunk(2)
        with torch.no_grad():
            ref_c, ref_r = self._token_logps(self.reference, batch, mask).sum(dim=-1).chunk(2)
        loss, chosen, rejected = dpo_loss(pi_c, pi_r, ref_c, ref_r, self.s.beta, self.s.label_smoothing)
        stats = {"chosen_reward": float(chosen.mean()), "rejected_reward": float(rejected.mean()),
                 "reward_accuracy": float((chosen > rejected).float().mean()),
                 "margin": float((chosen - rejected).mean())}
        if self.s.rpo_alpha > 0:
            nll = chosen_nll(tokens, mask)
            loss = loss + self.s.rpo_alpha * nll
            stats["chosen_nll"] = float(nll.detach())
        return loss, stats

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One backward and optimizer step of the policy engine on a pair batch."""
        self.policy.train()
        loss, stats = self.loss(batch)
        self.policy.backward(loss)
        self.policy.step()
        return {"loss": float(loss.detach()), **stats}
