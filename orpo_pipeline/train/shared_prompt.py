"""Compute each pair's prompt once: one packed row per pair instead of two rows that repeat the prompt.

A row is `prompt + chosen + rejected`. The rejected tokens take the positions right after the prompt (as in
their own sequence) and a 4D attention mask hides the chosen answer from them, so every hidden state is the
one the model computes on `prompt + chosen` or `prompt + rejected` alone. Stock TRL runs the prompt twice;
with prompts as long as the answers, that is a third of the work, plus the padding of the shorter answer.

With sdpa, attention runs per row as two causal pieces (`segmented_sdpa`): prompt + chosen with `is_causal`,
and the rejected queries over prompt + rejected keys with a lower-right causal bias. Both let the kernels skip
the masked half, which a general L x L mask does not (attention backward was a quarter of a CPU step with it).
Eager attention gets the equivalent 4D mask.

The hidden state that predicts completion token k sits at position P-1+k for the chosen answer, and at P-1
(k = 0, the shared last prompt token) or P+C+k-1 for the rejected one. `hidden_index` / `labels` gather them
into the [2B, W] layout (chosen rows, then rejected rows) that the ORPO losses read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import torch.nn.functional as F

IGNORE_INDEX = -100
SEGMENTED_SDPA = "orpo_segmented_sdpa"
MASKABLE_ATTENTION = ("sdpa", "eager", SEGMENTED_SDPA)  # flash-attention kernels take no custom mask


@dataclass
class SharedPromptBatch:
    input_ids: torch.Tensor  # [B, L]
    position_ids: torch.Tensor  # [B, L]
    segments: list[tuple[int, int, int]]  # per row: prompt, chosen and rejected token counts
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

    W = int(torch.maximum(C, R).max())
    w = torch.arange(W, device=dev)[None].expand(B, -1)
    chosen_index = (P[:, None] - 1 + w).clamp(max=L - 1)
    rejected_index = torch.where(w == 0, P[:, None] - 1, (P + C)[:, None] + w - 1).clamp(max=L - 1)
    chosen_labels = ids.gather(1, (P[:, None] + w).clamp(max=L - 1)).masked_fill(w >= C[:, None], IGNORE_INDEX)
    rejected_labels = ids.gather(1, ((P + C)[:, None] + w).clamp(max=L - 1)).masked_fill(w >= R[:, None], IGNORE_INDEX)
    return SharedPromptBatch(
        input_ids=ids,
        position_ids=position_ids,
        segments=list(zip(P.tolist(), C.tolist(), R.tolist())),
        chosen_index=chosen_index,
        rejected_index=rejected_index,
        labels=torch.cat([chosen_labels, rejected_labels]),
        padded_tokens=B * L,
    )


def allowed_mask(packed: SharedPromptBatch) -> torch.Tensor:
    """[B, 1, L, L] bool, True where a query may attend to a key."""
    B, L = packed.input_ids.shape
    dev = packed.input_ids.device
    P, C, R = (torch.tensor(x, device=dev) for x in zip(*packed.segments))
    q = torch.arange(L, device=dev)[None, :, None]
    k = torch.arange(L, device=dev)[None, None, :]
    valid_k = k < (P + C + R)[:, None, None]
    k_in_chosen = (k >= P[:, None, None]) & (k < (P + C)[:, None, None])
    q_in_rejected = q >= (P + C)[:, None, None]
    allowed = (k <= q) & valid_k & ~(q_in_rejected & k_in_chosen)
    allowed |= k == q  # a padding query sees itself: no fully masked row, no NaN from the softmax
    return allowed[:, None]


def decoder_inputs(packed: SharedPromptBatch, attn_implementation: str, dtype: torch.dtype) -> dict:
    """Keyword arguments for the decoder: the segments for segmented_sdpa, else an equivalent 4D mask."""
    common = {"input_ids": packed.input_ids, "position_ids": packed.position_ids}
    if attn_implementation == SEGMENTED_SDPA:
        return {**common, "attention_mask": None, "shared_prompt_segments": packed.segments}
    allowed = allowed_mask(packed)
    if attn_implementation == "sdpa":
        return {**common, "attention_mask": allowed}
    if attn_implementation == "eager":  # eager adds the mask to its scores: 0 / a very negative float
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
        return {**common, "attention_mask": mask}
    raise ValueError(f"attention '{attn_implementation}' takes no custom mask; shared prompts need one of "
                     f"{MASKABLE_ATTENTION}")


def segmented_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   shared_prompt_segments=None, **kwargs):
    """transformers attention function: plain sdpa, or per packed row the two causal pieces of a shared prompt.

    query [B, H, L, D], key / value [B, H_kv, L, D]; returns [B, L, H, D] like the built-in functions.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prompt_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    from torch.nn.attention.bias import causal_lower_right

    B, H, L, D = query.shape
    gqa = key.shape[1] != H
    device = query.device.type
    if torch.is_autocast_enabled(device):  # the lower-right bias checks dtypes before autocast would cast them
        dtype = torch.get_autocast_dtype(device)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    rows = []
    for i, (p, c, r) in enumerate(shared_prompt_segments):
        q, k, v = query[i:i + 1], key[i:i + 1], value[i:i + 1]
        chosen = F.scaled_dot_product_attention(q[:, :, :p + c], k[:, :, :p + c], v[:, :, :p + c], is_causal=True,
                                                dropout_p=dropout, scale=scaling, enable_gqa=gqa)
        seen = [slice(0, p), slice(p + c, p + c + r)]  # the rejected answer's own sequence: prompt, rejected
        k_r, v_r = torch.cat([k[:, :, s] for s in seen], 2), torch.cat([v[:, :, s] for s in seen], 2)
        if gqa:  # the lower-right bias calls the flash / efficient kernels directly, without GQA support
            k_r, v_r = k_r.repeat_interleave(H // k_r.shape[1], 1), v_r.repeat_interleave(H // v_r.shape[1], 1)
        rejected = F.scaled_dot_product_attention(
            q[:, :, p + c:p + c + r], k_r, v_r, attn_mask=causal_lower_right(r, p + r), dropout_p=dropout,
            scale=scaling)
        row = torch.cat([chosen, rejected], 2)
        rows.append(F.pad(row, (0, 0, 0, L - row.shape[2])))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


def register_segmented_sdpa() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa)
    if SEGMENTED_SDPA not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(SEGMENTED_SDPA, sdpa_mask)  # unpacked calls keep sdpa's padding masks
    return SEGMENTED_SDPA


def completion_hidden(hidden: torch.Tensor, packed: SharedPromptBatch) -> torch.Tensor:
    """[B, L, H] hidden states -> [2B, W, H]: the states that predict each chosen, then rejected, token."""
    H = hidden.shape[-1]
    take = lambda index: hidden.gather(1, index[..., None].expand(-1, -1, H))  # noqa: E731
    return torch.cat([take(packed.chosen_index), take(packed.rejected_index)])
