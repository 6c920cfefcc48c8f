"""Compute each pair's prompt once: one packed row per pair instead of two rows that repeat the prompt.

A row is `prompt + chosen + rejected`. The rejected tokens take the positions right after the prompt (as in
their own sequence) and a 4D attention mask hides the chosen answer from them, so every hidden state is the
one the model computes on `prompt + chosen` or `prompt + rejected` alone. Stock TRL runs the prompt twice;
with prompts as long as the answers, that is a third of the work, plus the padding of the shorter answer.

The hidden state that predicts completion token k sits at position P-1+k for the chosen answer, and at P-1
(k = 0, the shared last prompt token) or P+C+k-1 for the rejected one. `hidden_index` / `labels` gather them
into the [2B, W] layout (chosen rows, then rejected rows) that the ORPO losses read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
MASKABLE_ATTENTION = ("sdpa", "eager")  # flash-attention kernels take no custom 4D mask


@dataclass
class SharedPromptBatch:
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    allowed: torch.Tensor  # [B, 1, L, L] bool, True: the query may attend to the key
    chosen_index: torch.Tensor  # [B, W] position whose hidden state predicts chosen token k
    rejected_index: torch.Tensor  # [B, W]
    labels: torch.Tensor  # [2B, W] the token predicted there, IGNORE_INDEX past the completion
    padded_tokens: int  # B * L, the tokens the model runs on


def pack_shared_prompt(batch: dict, pad_token_id: int) -> SharedPromptBatch:
    """From the padded collator batch (prompt left-padded; prompt+answer right-padded) to packed rows."""
    chosen_ids, rejected_ids = batch["chosen_input_ids"], batch["rejected_input_ids"]
    dev = chosen_ids.device
    P = batch["prompt_attention_mask"].sum(1)
    C = batch["chosen_attention_mask"].sum(1) - P
    R = batch["rejected_attention_mask"].sum(1) - P
    if bool((P < 1).any()) or bool((C < 1).any()) or bool((R < 1).any()):
        raise ValueError("every pair needs a non-empty prompt, chosen and rejected answer to share the prompt")
    B, total = len(P), P + C + R
    L = int(total.max())
    j = torch.arange(L, device=dev)[None].expand(B, -1)
    in_prompt_or_chosen = j < (P + C)[:, None]
    in_rejected = ~in_prompt_or_chosen & (j < total[:, None])
    shift = j - C[:, None]  # rejected token at j sits at j - C in its own sequence
    ids = torch.where(
        in_prompt_or_chosen,
        chosen_ids.gather(1, j.clamp(max=chosen_ids.shape[1] - 1)),
        rejected_ids.gather(1, shift.clamp(0, rejected_ids.shape[1] - 1)),
    )
    valid = in_prompt_or_chosen | in_rejected
    ids = ids.masked_fill(~valid, pad_token_id)
    position_ids = torch.where(in_rejected, shift, j).masked_fill(~valid, 0)

    q, k = j[:, :, None], j[:, None, :]
    k_in_chosen = (k >= P[:, None, None]) & (k < (P + C)[:, None, None])
    q_in_rejected = in_rejected[:, :, None]
    allowed = (k <= q) & valid[:, None, :] & ~(q_in_rejected & k_in_chosen)
    allowed |= k == q  # a padding query sees itself: no fully masked row, no NaN from the softmax

    W = int(torch.maximum(C, R).max())
    w = torch.arange(W, device=dev)[None].expand(B, -1)
    chosen_index = (P[:, None] - 1 + w).clamp(max=L - 1)
    rejected_index = torch.where(w == 0, P[:, None] - 1, (P + C)[:, None] + w - 1).clamp(max=L - 1)
    chosen_labels = ids.gather(1, (P[:, None] + w).clamp(max=L - 1)).masked_fill(w >= C[:, None], IGNORE_INDEX)
    rejected_labels = ids.gather(1, ((P + C)[:, None] + w).clamp(max=L - 1)).masked_fill(w >= R[:, None], IGNORE_INDEX)
    return SharedPromptBatch(
        input_ids=ids,
        position_ids=position_ids,
        allowed=allowed[:, None],
        chosen_index=chosen_index,
        rejected_index=rejected_index,
        labels=torch.cat([chosen_labels, rejected_labels]),
        padded_tokens=B * L,
    )


def attention_mask_for(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """sdpa reads a boolean mask; eager adds the mask to its scores, so it needs 0 / -inf-like floats."""
    if attn_implementation == "sdpa":
        return allowed
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    raise ValueError(f"attention '{attn_implementation}' takes no custom mask; shared prompts need one of "
                     f"{MASKABLE_ATTENTION}")


def completion_hidden(hidden: torch.Tensor, packed: SharedPromptBatch) -> torch.Tensor:
    """[B, L, H] hidden states -> [2B, W, H]: the states that predict each chosen, then rejected, token."""
    H = hidden.shape[-1]
    take = lambda index: hidden.gather(1, index[..., None].expand(-1, -1, H))  # noqa: E731
    return torch.cat([take(packed.chosen_index), take(packed.rejected_index)])
