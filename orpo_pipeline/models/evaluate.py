"""Held-out preference benchmark: does the model prefer the chosen answer?

Scores are computed on the tokenized eval split (same template and truncation
as training), per pair, from average completion log-probabilities:
- preference_accuracy: share of pairs where mean log p(chosen) > mean log p(rejected)
- mean_log_odds_margin: mean ORPO log odds ratio log(odds(chosen) / odds(rejected))
- chosen_nll: token-level negative log-likelihood of the chosen answers
"""

from __future__ import annotations

from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from ..train.loss import log1mexp


def _pad(seqs: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs])


@torch.no_grad()
def completion_logps(model, ids: list[list[int]], labels: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of completion log-probs and completion token counts, per sequence."""
    x, y = _pad(ids, pad_id).to(model.device), _pad(labels, -100).to(model.device)
    mask = _pad([[1] * len(s) for s in ids], 0).to(model.device)
    logits = model(x, attention_mask=mask, use_cache=False).logits[:, :-1].float()
    y = y[:, 1:]
    keep = y != -100
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * keep).sum(-1).cpu(), keep.sum(-1).cpu()


def score_preferences(model, tokenizer, eval_data: datasets.Dataset, batch_size: int = 8, max_pairs: int = 300) -> dict:
    model.eval()
    data = eval_data.select(range(min(max_pairs, len(eval_data))))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chosen_sum, chosen_n, rejected_sum, rejected_n = [], [], [], []
    for start in tqdm(range(0, len(data), batch_size), desc="scoring pairs", leave=False):
        b = data[start : start + batch_size]
        s, n = completion_logps(model, b["chosen_input_ids"], b["chosen_labels"], pad)
        chosen_sum.append(s), chosen_n.append(n)
        s, n = completion_logps(model, b["rejected_input_ids"], b["rejected_labels"], pad)
        rejected_sum.append(s), rejected_n.append(n)
    if not chosen_sum:
        raise ValueError("the eval split is empty: no pairs to score")
    cs, cn = torch.cat(chosen_sum), torch.cat(chosen_n).clamp(min=1)
    rs, rn = torch.cat(rejected_sum), torch.cat(rejected_n).clamp(min=1)
    c, r = cs / cn, rs / rn
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    return {
        "preference_accuracy": float((c > r).float().mean()),
        "mean_log_odds_margin": float(log_odds.mean()),
        "chosen_nll": float(-cs.sum() / cn.sum()),
        "pairs": int(len(c)),
    }


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], max_new_tokens: int = 48) -> list[dict]:
    out = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        out.append({"prompt": prompt, "completion": text})
    return out


def load_for_eval(model_dir: Path, tokenizer_dir: Path | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or model_dir)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # a chat template added tokens the base lacks
        model.resize_token_embeddings(len(tokenizer))
    return model, tokenizer


def benchmark_model(model_dir: Path, eval_data: datasets.Dataset, prompts: list[str], batch_size: int = 8,
                    max_pairs: int = 300, max_new_tokens: int = 48, tokenizer_dir: Path | None = None) -> dict:
    model, tokenizer = load_for_eval(Path(model_dir), tokenizer_dir)
    scores = score_preferences(model, tokenizer, eval_data, batch_size, max_pairs)
    scores["generations"] = generate_samples(model, tokenizer, prompts, max_new_tokens)
    return scores
