"""Chat-template and tokenize preference pairs once, into the layout the trainer reads.

The columns are the ones TRL's ORPO `tokenize_row` produces (prompt_*, chosen_*,
rejected_* input_ids / attention_mask / labels), built the same way: template the
prompt with a generation prompt, template prompt + answer and keep the suffix,
add BOS / EOS when missing. Where nothing is truncated the ids are identical.

Truncation differs on purpose: stock TRL cuts completions first, and a long
prompt can leave a completion with zero tokens (its loss is then NaN). Here the
prompt is cut first (its end kept, so the assistant header survives), never
below `max_prompt_length`; completions keep at least `min_completion_tokens`;
a pair that still does not fit is dropped with a reason. Optional length bounds
drop pairs that are too long (instead of truncating them) or too short.
"""

from __future__ import annotations

import gc
import itertools
from dataclasses import dataclass, field

import datasets
import numpy as np
import polars as pl
import pyarrow as pa

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
# why tokenize_pairs drops a pair: it cannot fit max_length, or breaks a length bound
DROP_REASONS = ["does_not_fit", "too_long", "too_short"]


@dataclass
class TokenizedSplit:
    dataset: datasets.Dataset
    dropped: list[dict] = field(default_factory=list)
    truncated_prompt: int = 0
    truncated_completion: int = 0


def template_texts(tokenizer, prompts: list[list[dict]], answers: list[str]) -> tuple[list[str], list[str]]:
    """Prompt text (with generation prompt) and the answer's templated suffix, as TRL does it."""
    prompt_texts, (suffixes,) = template_suffixes(tokenizer, prompts, answers)
    return prompt_texts, suffixes


def template_suffixes(tokenizer, prompts: list[list[dict]], *answer_lists: list[str]):
    """The prompt rendered once, and for each answer list the templated suffix that follows it."""
    prompt_texts = tokenizer.apply_chat_template(prompts, add_generation_prompt=True, tokenize=False)
    out = []
    for answers in answer_lists:
        full = tokenizer.apply_chat_template(
            [p + [{"role": "assistant", "content": a}] for p, a in zip(prompts, answers)], tokenize=False
        )
        suffixes = []
        for p, f in zip(prompt_texts, full):
            if not f.startswith(p):
                raise ValueError("the chat template renders the prompt differently once an answer follows it")
            suffixes.append(f[len(p):])
        out.append(suffixes)
    return prompt_texts, out


def encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; the Rust backend's batch call that skips offsets when there is one."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch_fast"):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _list_column(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _flat(rows: list[list[int]], total: int) -> np.ndarray:
    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)


def _token_table(ps: list[list[int]], cs: list[list[int]], rs: list[list[int]]) -> dict[str, pa.Array]:
    """TRL's eight token columns (int64 lists) and the three lengths, built from flat arrays rather than per-row
    Python lists."""
    lengths = {name: np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
               for name, rows in (("prompt", ps), ("chosen", cs), ("rejected", rs))}
    P = lengths["prompt"]
    cols: dict[str, pa.Array] = {"prompt_input_ids": _list_column(_flat(ps, P.sum()), P),
                                 "prompt_attention_mask": _list_column(np.ones(P.sum(), dtype=np.int64), P)}
    for name, answers in (("chosen", cs), ("rejected", rs)):
        n = P + lengths[name]
        flat = _flat([x for pair in zip(ps, answers) for x in pair], n.sum())
        in_prompt = np.arange(len(flat)) - np.repeat(np.cumsum(n) - n, n) < np.repeat(P, n)
        cols[f"{name}_input_ids"] = _list_column(flat, n)
        cols[f"{name}_attention_mask"] = _list_column(np.ones(len(flat), dtype=np.int64), n)
        cols[f"{name}_labels"] = _list_column(np.where(in_prompt, -100, flat), n)
    return cols | {f"{name}_tokens": pa.array(n) for name, n in lengths.items()}


def _out_of_bounds(prompt: int, chosen: int, rejected: int, max_pair_tokens: int, min_answer_tokens: int
                   ) -> tuple[str, str] | None:
    """(reason, why) if the pair's token counts break a length bound."""
    if max_pair_tokens and prompt + max(chosen, rejected) > max_pair_tokens:
        return "too_long", (f"prompt {prompt} + longer answer {max(chosen, rejected)} tokens > max_pair_tokens "
                            f"{max_pair_tokens}")
    if min_answer_tokens and min(chosen, rejected) < min_answer_tokens:
        return "too_short", f"shorter answer {min(chosen, rejected)} tokens < min_answer_tokens {min_answer_tokens}"
    return None


def tokenize_pairs(table: pl.DataFrame, tokenizer, max_length: int = 512, max_prompt_length: int = 0,
                   min_completion_tokens: int = 32, max_pair_tokens: int = 0, min_answer_tokens: int = 0
                   ) -> TokenizedSplit:
    """Tokenize a cleaned preference table (prompt messages, chosen, rejected).

    Length bounds (0: off), on the tokens the trainer would see before any truncation (BOS, end-of-turn and EOS
    included): a pair whose prompt + longer answer exceeds `max_pair_tokens` is dropped as `too_long` instead of
    truncated; a pair whose shorter answer has fewer than `min_answer_tokens` is dropped as `too_short`."""
    # millions of fresh token lists set off the cyclic garbage collector again and again (a tenth of the time);
    # they hold only ints, so there is nothing for it to find
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _tokenize_pairs(table, tokenizer, max_length, max_prompt_length, min_completion_tokens,
                               max_pair_tokens, min_answer_tokens)
    finally:
        if enabled:
            gc.enable()


def _tokenize_pairs(
    table: pl.DataFrame,
    tokenizer,
    max_length: int = 512,
    max_prompt_length: int = 0,
    min_completion_tokens: int = 32,
    max_pair_tokens: int = 0,
    min_answer_tokens: int = 0,
) -> TokenizedSplit:
    max_prompt = max_prompt_length or max(1, max_length - min_completion_tokens)
    prompts = table["prompt"].to_list()
    prompt_texts, (chosen_texts, rejected_texts) = template_suffixes(
        tokenizer, prompts, table["chosen"].to_list(), table["rejected"].to_list())
    n = len(prompts)
    ids = encode(tokenizer, prompt_texts + chosen_texts + rejected_texts)  # one call: one parallel pass
    p_ids, c_ids, r_ids = ids[:n], ids[n:2 * n], ids[2 * n:]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    ps, cs, rs, kept_hashes = [], [], [], []
    out = TokenizedSplit(dataset=None)  # type: ignore[arg-type]
    hashes = table["content_hash"].to_list()
    sources = table.select(pl.format("{}:{}", "source_file", "source_row")).to_series().to_list()
    def drop(i: int, reason: str, why: str) -> None:
        out.dropped.append({"content_hash": hashes[i], "source": sources[i], "reason": reason,
                            "detail": f"{sources[i]}: {why}"})

    for i, (p, c, r) in enumerate(zip(p_ids, c_ids, r_ids)):
        if bos is not None and (not p or p[0] != bos):
            p = [bos] + p
        c = c if c and c[-1] == eos else c + [eos]
        r = r if r and r[-1] == eos else r + [eos]
        longest = max(len(c), len(r))
        bound = _out_of_bounds(len(p), len(c), len(r), max_pair_tokens, min_answer_tokens)
        if bound is not None:
            drop(i, *bound)
            continue
        if len(p) + longest > max_length:
            if len(p) > max_prompt:
                p = p[-max(max_prompt, max_length - longest):]
                out.truncated_prompt += 1
            budget = max_length - len(p)
            if budget < min(min_completion_tokens, min(len(c), len(r))) or budget <= 0:
                drop(i, "does_not_fit", f"prompt {len(p)} tokens leaves {budget} < {min_completion_tokens} "
                     f"completion tokens within max_length {max_length}")
                continue
            if longest > budget:
                out.truncated_completion += 1
            c, r = c[:budget], r[:budget]
        ps.append(p)
        cs.append(c)
        rs.append(r)
        kept_hashes.append(hashes[i])
    cols = _token_table(ps, cs, rs)
    lengths = {k: cols.pop(k) for k in ("prompt_tokens", "chosen_tokens", "rejected_tokens")}
    out.dataset = datasets.Dataset(pa.table(cols | {"content_hash": pa.array(kept_hashes, pa.string())} | lengths))
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
