"""Chat-template and tokenize preference pairs once, into the layout the trainer reads.

The columns are the ones TRL's ORPO `tokenize_row` produces (prompt_*, chosen_*,
rejected_* input_ids / attention_mask / labels), built the same way: template the
prompt with a generation prompt, template prompt + answer and keep the suffix,
add BOS / EOS when missing. Where nothing is truncated the ids are identical.

Truncation differs on purpose: stock TRL cuts completions first, and a long
prompt can leave a completion with zero tokens (its loss is then NaN). Here the
prompt is cut first (its end kept, so the assistant header survives), never
below `max_prompt_length`; completions keep at least `min_completion_tokens`;
a pair that still does not fit is dropped with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import datasets
import polars as pl

TOKEN_COLUMNS = [
    "prompt_input_ids",
    "prompt_attention_mask",
    "chosen_input_ids",
    "chosen_attention_mask",
    "chosen_labels",
    "rejected_input_ids",
    "rejected_attention_mask",
    "rejected_labels",
]


@dataclass
class TokenizedSplit:
    dataset: datasets.Dataset
    dropped: list[dict] = field(default_factory=list)
    truncated_prompt: int = 0
    truncated_completion: int = 0


def template_texts(tokenizer, prompts: list[list[dict]], answers: list[str]) -> tuple[list[str], list[str]]:
    """Prompt text (with generation prompt) and the answer's templated suffix, as TRL does it."""
    prompt_texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(
        [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)], tokenize=False
    )
    suffixes = []
    for p, f in zip(prompt_texts, full):
        if not f.startswith(p):
            raise ValueError("the chat template renders the prompt differently once an answer follows it")
        suffixes.append(f[len(p):])
    return prompt_texts, suffixes


def tokenize_pairs(
    table: pl.DataFrame,
    tokenizer,
    max_length: int = 512,
    max_prompt_length: int = 0,
    min_completion_tokens: int = 32,
) -> TokenizedSplit:
    """Tokenize a cleaned preference table (prompt messages, chosen, rejected)."""
    max_prompt = max_prompt_length or max(1, max_length - min_completion_tokens)
    prompts = table["prompt"].to_list()
    prompt_texts, chosen_texts = template_texts(tokenizer, prompts, table["chosen"].to_list())
    _, rejected_texts = template_texts(tokenizer, prompts, table["rejected"].to_list())
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    p_ids, c_ids, r_ids = enc(prompt_texts), enc(chosen_texts), enc(rejected_texts)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    cols: dict[str, list] = {k: [] for k in TOKEN_COLUMNS}
    cols.update(content_hash=[], prompt_tokens=[], chosen_tokens=[], rejected_tokens=[])
    out = TokenizedSplit(dataset=None)  # type: ignore[arg-type]
    hashes = table["content_hash"].to_list()
    sources = table.select(pl.format("{}:{}", "source_file", "source_row")).to_series().to_list()
    for i, (p, c, r) in enumerate(zip(p_ids, c_ids, r_ids)):
        if bos is not None and (not p or p[0] != bos):
            p = [bos] + p
        c = c if c and c[-1] == eos else c + [eos]
        r = r if r and r[-1] == eos else r + [eos]
        longest = max(len(c), len(r))
        if len(p) + longest > max_length:
            if len(p) > max_prompt:
                p = p[-max(max_prompt, max_length - longest):]
                out.truncated_prompt += 1
            budget = max_length - len(p)
            if budget < min(min_completion_tokens, min(len(c), len(r))) or budget <= 0:
                out.dropped.append(
                    {
                        "content_hash": hashes[i],
                        "source": sources[i],
                        "reason": "does_not_fit",
                        "detail": f"{sources[i]}: prompt {len(p)} tokens leaves {budget} < {min_completion_tokens} "
                        f"completion tokens within max_length {max_length}",
                    }
                )
                continue
            if longest > budget:
                out.truncated_completion += 1
            c, r = c[:budget], r[:budget]
        for name, ans in (("chosen", c), ("rejected", r)):
            cols[f"{name}_input_ids"].append(p + ans)
            cols[f"{name}_attention_mask"].append([1] * (len(p) + len(ans)))
            cols[f"{name}_labels"].append([-100] * len(p) + ans)
            cols[f"{name}_tokens"].append(len(ans))
        cols["prompt_input_ids"].append(p)
        cols["prompt_attention_mask"].append([1] * len(p))
        cols["prompt_tokens"].append(len(p))
        cols["content_hash"].append(hashes[i])
    out.dataset = datasets.Dataset.from_dict(cols)
    return out


def dataset_digest(*splits: datasets.Dataset) -> str:
    """Digest of the token columns, in row order (order is what the trainer sees)."""
    import hashlib

    import pyarrow as pa

    h = hashlib.sha256()
    for ds in splits:
        table = ds.select_columns(TOKEN_COLUMNS).data.table
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:32]  # MLflow caps dataset digests at 36 chars
