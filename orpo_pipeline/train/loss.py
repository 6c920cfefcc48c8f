"""ORPO loss (Hong et al. 2024, arXiv 2403.07691): a reference version on full logits and a fused,
chunked version on last hidden states that never materializes the [2B, T, V] logits.

Batch layout (as in TRL): rows [0, B) are the chosen sequences, rows [B, 2B) the rejected ones, each
row = prompt + completion (+ padding). `labels` is [2B, T], UNSHIFTED (labels[i, t] is the token at
position t) with -100 on prompt and padding positions. Both entry points apply the causal shift
themselves: position t-1 predicts token t, i.e. we use logits[:, :-1] (or hidden_states[:, :-1])
against labels[:, 1:]. Pass the model outputs and labels as they are.

Definitions (per pair i, c_i / r_i over the completion tokens only):
    c_i, r_i  = MEAN log p(token) over the completion tokens of chosen / rejected row i
                (length-normalized, as in the paper and TRL: sums would favour short answers)
    log_odds  = (c - r) - (log1mexp(c) - log1mexp(r)),  log1mexp(x) = log(1 - exp(x))
    ratio     = logsigmoid(log_odds)
    nll       = cross-entropy averaged over ALL chosen completion tokens of the batch, pooled
                (a token-level mean, not a mean of per-row means)
    loss      = nll - beta * ratio.mean()
OrpoLossOutput.log_odds_ratio is ratio.mean() and log_odds_chosen is log_odds.mean(); these are
TRL's `log_odds_ratio` / `log_odds_chosen` metrics.

Note: TRL 1.16's ORPOTrainer computes its NLL over prompt + completion of the chosen rows; we
(deliberately) use completion tokens only, i.e. the same tokens as the logps.
"""

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class OrpoLossOutput:
    loss: torch.Tensor  # scalar, what you backprop
    nll_loss: torch.Tensor  # scalar
    chosen_logps: torch.Tensor  # [B], mean completion log-prob
    rejected_logps: torch.Tensor  # [B]
    log_odds_ratio: torch.Tensor  # scalar, mean of logsigmoid(log_odds)
    log_odds_chosen: torch.Tensor  # scalar, mean of log_odds


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012), same as TRL's."""
    # log1p(-exp(x)) cancels catastrophically as x -> 0 (a confident model: c close to 0),
    # log(-expm1(x)) loses precision as x -> -inf; switch at -ln 2.
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _log_odds(chosen_logps, rejected_logps):
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def orpo_loss_from_logits(logits: torch.Tensor, labels: torch.Tensor, beta: float) -> OrpoLossOutput:
    """Unfused reference. logits [2B, T, V], labels [2B, T] unshifted (see module docstring)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    if logits.dtype in (torch.float16, torch.bfloat16):  # log_softmax in half precision is too lossy
        logits = logits.float()
    B = labels.shape[0] // 2
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    token_logps = logp.gather(-1, torch.where(mask, labels, 0).unsqueeze(-1)).squeeze(-1) * mask
    seq_logps = token_logps.sum(-1) / mask.sum(-1)
    nll = -token_logps[:B].sum() / mask[:B].sum()
    chosen, rejected = seq_logps[:B], seq_logps[B:]
    log_odds = _log_odds(chosen, rejected)
    ratio = F.logsigmoid(log_odds)
    return OrpoLossOutput(nll - beta * ratio.mean(), nll, chosen, rejected, ratio.mean(), log_odds.mean())


@functools.cache
def _liger_orpo_function():
    # liger-kernel is an optional (cuda) extra: import it only when the fused path is used.
    from liger_kernel.chunked_loss.orpo_loss import LigerFusedLinearORPOFunction

    class StableLigerORPOFunction(LigerFusedLinearORPOFunction):
        # liger 0.8.5's ORPO already matches our definition (mean logps, NLL summed per chunk and
        # divided by the chosen-token count of the whole batch, loss = nll - beta * mean(ratio)),
        # except that it uses log1p(-exp(x)), which cancels for logps near 0 (float32 error ~1e-4
        # relative at c = -1e-3, inf at c = 0). Only that piece is replaced.
        @staticmethod
        def preference_loss_fn(chosen_logps, rejected_logps, full_target, beta=0.1):
            log_odds = _log_odds(chosen_logps, rejected_logps)
            ratio = F.logsigmoid(log_odds)
            n_pairs = full_target.shape[0] // 2  # per-chunk sums over the full B add up to batch means
            return -beta * ratio.sum() / n_pairs, ratio.sum() / n_pairs, log_odds.sum() / n_pairs

    return StableLigerORPOFunction


def orpo_loss_fused(
    hidden_states: torch.Tensor,
    lm_head_weight: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    lm_head_bias: torch.Tensor | None = None,
    chunk_size: int = 1,
    compiled: bool = False,
) -> OrpoLossOutput:
    """Same value and gradients as orpo_loss_from_logits(hidden_states @ W.T + b, labels, beta),
    computed by liger's chunked fused-linear preference loss: logits exist for only `chunk_size`
    (chosen, rejected) pairs at a time, and their gradient is taken during the forward.

    hidden_states [2B, T, H] = final (post-norm) hidden states, labels [2B, T] unshifted; we shift
    here (hidden_states[:, :-1] vs labels[:, 1:]). Liger computes log-softmax and accumulates the
    loss in float32, so `loss` and the metrics are float32 whatever the input dtype (grads keep
    the input dtype). The metrics are detached: liger's backward only honours grads of `loss`.
    compiled=True torch.compiles the per-chunk forward+backward; worth it on GPU, slow to compile
    on a few CPU cores.
    """
    fn = _liger_orpo_function()
    loss, aux = fn.apply(
        hidden_states[:, :-1],
        lm_head_weight,
        labels[:, 1:],
        lm_head_bias,
        IGNORE_INDEX,
        beta,
        True,  # compute_nll_loss
        None,  # nll_target: None = the same completion labels
        compiled,
        chunk_size,
    )
    chosen, rejected, _chosen_logits_mean, _rejected_logits_mean, nll, log_odds_ratio, log_odds_chosen = aux
    return OrpoLossOutput(
        loss, nll.detach(), chosen.detach(), rejected.detach(), log_odds_ratio.detach(), log_odds_chosen.detach()
    )


def causal_lm_hidden_and_head(model, input_ids, attention_mask=None, **decoder_kwargs):
    """Run a HF causal LM (bare or wrapped in a peft PeftModel) up to its final hidden states,
    skipping the lm_head. Returns (hidden_states [N, T, H], lm_head weight [V, H], lm_head bias or None).
    LoRA layers live inside the base modules, so calling the backbone directly keeps them active."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if hasattr(head, "base_layer"):
        raise NotImplementedError("lm_head is adapter-wrapped; its plain weight would silently drop the adapter")
    cfg = base.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
        raise NotImplementedError(f"{cfg.model_type} post-processes its logits; the fused loss would differ")
    out = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **decoder_kwargs)
    return out.last_hidden_state, head.weight, head.bias
