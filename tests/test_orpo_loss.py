"""ORPO loss: fused (liger, chunked) vs reference (full logits) vs hand-computed vs TRL 1.16."""

import math
from types import SimpleNamespace

import pytest
import torch

from orpo_pipeline.train.loss import (
    OrpoLossOutput,
    causal_lm_hidden_and_head,
    orpo_loss_from_logits,
    orpo_loss_fused,
)

# liger computes log-softmax and accumulates the loss in float32 even for float64 inputs, so the
# float64 comparison is float32-accurate; still far tighter than any sign/normalization bug.
TOL = {torch.float64: dict(rtol=1e-5, atol=1e-6), torch.float32: dict(rtol=1e-4, atol=1e-5)}
METRICS = ("loss", "nll_loss", "chosen_logps", "rejected_logps", "log_odds_ratio", "log_odds_chosen")

try:
    import liger_kernel.chunked_loss  # noqa: F401

    HAVE_LIGER = True
except ImportError:  # liger-kernel is the optional `cuda` extra
    HAVE_LIGER = False
needs_liger = pytest.mark.skipif(not HAVE_LIGER, reason="liger-kernel not installed")


def random_labels(n_rows, T, V, gen):
    """Right-padded rows of random prompt / completion lengths; -100 on prompt and padding."""
    labels = torch.full((n_rows, T), -100)
    for i in range(n_rows):
        p = int(torch.randint(1, T - 2, (1,), generator=gen))
        c = int(torch.randint(1, T - p + 1, (1,), generator=gen))
        labels[i, p : p + c] = torch.randint(0, V, (c,), generator=gen)
    return labels


def assert_outputs_close(a: OrpoLossOutput, b: OrpoLossOutput, tol):
    for name in METRICS:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), check_dtype=False, **tol, msg=name)


@needs_liger
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,chunk_size,bias", [(2, 1, False), (3, 1, True), (3, 2, False), (2, 4, True)])
def test_fused_matches_reference(dtype, B, chunk_size, bias):
    gen = torch.Generator().manual_seed(B * 10 + chunk_size)
    T, V, H, beta = 12, 300, 16, 0.25
    h = torch.randn(2 * B, T, H, generator=gen, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=gen, dtype=dtype) * 0.7).requires_grad_()
    b = torch.randn(V, generator=gen, dtype=dtype).requires_grad_() if bias else None
    labels = random_labels(2 * B, T, V, gen)
    params = [h, w] + ([b] if bias else [])

    ref = orpo_loss_from_logits(h @ w.T + (b if bias else 0), labels, beta)
    ref_grads = torch.autograd.grad(ref.loss, params)
    fused = orpo_loss_fused(h, w, labels, beta, lm_head_bias=b, chunk_size=chunk_size)
    fused_grads = torch.autograd.grad(fused.loss, params)

    assert_outputs_close(fused, ref, TOL[dtype])
    for name, g_ref, g_fused in zip(["hidden", "weight", "bias"], ref_grads, fused_grads):
        assert g_fused.dtype == dtype
        torch.testing.assert_close(g_fused, g_ref, **TOL[dtype], msg=name)
    assert ref_grads[0][:, -1].abs().max() == 0  # the last position predicts nothing
    assert torch.isfinite(fused.loss)


def hand_example():
    """B=1: chosen completes 3 tokens, rejected 1, so sums and means of logps differ."""
    gen = torch.Generator().manual_seed(0)
    V, T = 5, 5
    logits = torch.randn(2, T, V, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 1, 4], [-100, -100, 2, -100, -100]])
    return logits, labels


def hand_orpo(logits, labels, beta, reduce=torch.mean):
    """Written straight from the paper, one token at a time, no shared code with the module."""

    def token_logps(row):
        return torch.stack(
            [torch.log_softmax(logits[row, t - 1], -1)[labels[row, t]] for t in range(1, labels.shape[1]) if labels[row, t] != -100]
        )

    c_tok, r_tok = token_logps(0), token_logps(1)
    c, r = reduce(c_tok), reduce(r_tok)
    odds = lambda lp: torch.exp(lp) / (1 - torch.exp(lp))  # noqa: E731
    log_or = torch.log(odds(c) / odds(r))
    return -c_tok.mean() - beta * torch.log(torch.sigmoid(log_or)), c, r


def both_losses(logits, labels, beta):
    """Reference on logits, and fused with W = I so that the hidden states are the logits."""
    out = [orpo_loss_from_logits(logits, labels, beta)]
    if not HAVE_LIGER:
        return out
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
    return out + [orpo_loss_fused(logits, eye, labels, beta)]


def test_hand_computed_value_and_length_normalization():
    logits, labels = hand_example()
    beta = 0.5
    expected, c, r = hand_orpo(logits, labels, beta)
    summed, _, _ = hand_orpo(logits, labels, beta, reduce=torch.sum)
    assert abs(summed - expected) > 1e-2  # the example can tell a sum from a mean
    for out in both_losses(logits, labels, beta):
        torch.testing.assert_close(out.loss, expected, check_dtype=False, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.chosen_logps, c.reshape(1), check_dtype=False, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.rejected_logps, r.reshape(1), check_dtype=False, rtol=1e-5, atol=1e-6)


def test_sign_lower_rejected_or_higher_chosen_lowers_loss():
    logits, labels = hand_example()
    beta = 0.5
    base = [o.loss.item() for o in both_losses(logits, labels, beta)]
    worse_rejected = logits.clone()
    worse_rejected[1, 1, 2] -= 2.0  # position 1 predicts the rejected token 2
    better_chosen = logits.clone()
    better_chosen[0, 2, 1] += 2.0  # position 2 predicts chosen token 1
    for new in (worse_rejected, better_chosen):
        for before, out in zip(base, both_losses(new, labels, beta)):
            assert out.loss.item() < before
    # the odds-ratio term alone is a penalty: beta = 0 gives back the NLL
    for out in both_losses(logits, labels, 0.0):
        torch.testing.assert_close(out.loss.double(), out.nll_loss.double(), rtol=1e-6, atol=1e-7)


def test_nll_pools_tokens_across_rows():
    gen = torch.Generator().manual_seed(1)
    V, T = 7, 6
    logits = torch.randn(4, T, V, generator=gen, dtype=torch.float64)
    labels = torch.full((4, T), -100)
    labels[0, 5] = 1  # chosen row 0: 1 completion token
    labels[1, 2:6] = torch.tensor([0, 2, 4, 6])  # chosen row 1: 4 tokens
    labels[2, 3:5] = torch.tensor([3, 3])
    labels[3, 4] = 5
    lp = torch.log_softmax(logits, -1)
    row0 = lp[0, 4, 1].reshape(1)
    row1 = torch.stack([lp[1, t - 1, labels[1, t]] for t in range(2, 6)])
    pooled = -torch.cat([row0, row1]).mean()
    per_row = -(row0.mean() + row1.mean()) / 2
    assert abs(pooled - per_row) > 1e-2
    for out in both_losses(logits, labels, 0.1):
        torch.testing.assert_close(out.nll_loss, pooled, check_dtype=False, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out.chosen_logps, torch.stack([row0.mean(), row1.mean()]), check_dtype=False)


def test_reference_agrees_with_trl_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    gen = torch.Generator().manual_seed(2)
    B, T, V, beta = 3, 10, 50, 0.1
    logits = torch.randn(2 * B, T, V, generator=gen, dtype=torch.float64)
    labels = random_labels(2 * B, T, V, gen)
    # make chosen row 0 confident (mean logp > -ln 2) so TRL's second log1mexp branch is exercised too
    for t in range(1, T):
        if labels[0, t] != -100:
            logits[0, t - 1, labels[0, t]] += 8.0
    out = orpo_loss_from_logits(logits, labels, beta)
    assert out.chosen_logps[0] > -math.log(2)

    trl_logps = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    torch.testing.assert_close(out.chosen_logps, trl_logps[:B])
    torch.testing.assert_close(out.rejected_logps, trl_logps[B:])
    fake_self = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, _, _, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        fake_self, out.chosen_logps, out.rejected_logps
    )
    # TRL casts to float32 inside odds_ratio_loss
    tol = dict(rtol=1e-5, atol=1e-6, check_dtype=False)
    torch.testing.assert_close(out.log_odds_ratio, log_odds_ratio, **tol)
    torch.testing.assert_close(out.log_odds_chosen, log_odds_chosen, **tol)
    # TRL: loss = nll - losses.mean() with losses = beta * logsigmoid(log_odds)
    torch.testing.assert_close(out.loss, out.nll_loss - losses.mean(), **tol)


def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg).eval()  # eval: no dropout, so both passes see the same network


def llama_batch(B, T, V, seed):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, V, (2 * B, T), generator=gen)
    labels = random_labels(2 * B, T, V, gen)
    attention_mask = torch.ones_like(input_ids)
    for i in range(2 * B):  # right padding after the last label
        last = int((labels[i] != -100).nonzero().max())
        attention_mask[i, last + 1 :] = 0
        input_ids[i, last + 1 :] = 0
    labels = torch.where(labels == -100, -100, input_ids)  # completion labels are the input tokens
    return input_ids, attention_mask, labels


@needs_liger
@pytest.mark.parametrize("lora", [False, True])
def test_tiny_llama_fused_matches_full_logits(lora):
    model = tiny_llama(seed=3)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():  # lora_B starts at zero, which would zero lora_A's gradient
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    input_ids, attention_mask, labels = llama_batch(B=2, T=12, V=512, seed=4)
    beta = 0.2

    ref = orpo_loss_from_logits(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels, beta)
    ref_grads = torch.autograd.grad(ref.loss, [p for _, p in trainable])
    hidden, weight, bias = causal_lm_hidden_and_head(model, input_ids, attention_mask)
    assert hidden.shape == (4, 12, 32) and weight.shape == (512, 32) and bias is None
    fused = orpo_loss_fused(hidden, weight, labels, beta)
    fused_grads = torch.autograd.grad(fused.loss, [p for _, p in trainable])

    assert_outputs_close(fused, ref, TOL[torch.float32])
    if lora:
        assert {n.split(".")[-3] for n, _ in trainable} == {"lora_A", "lora_B"}
        assert len(trainable) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    for (name, _), g_ref, g_fused in zip(trainable, ref_grads, fused_grads):
        assert g_ref.abs().max() > 0, name
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-5, msg=name)
