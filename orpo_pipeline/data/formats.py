"""Preference formats: one record (a dict) -> one normalized pair, and which format a record is.

Normalized shape: `prompt` is a list of {role, content} messages (the whole conversation before the answer,
system messages included), `chosen` / `rejected` are the final assistant answers as text, `score_chosen` /
`score_rejected` are floats or null. A plain-string prompt becomes a single user message; a top-level `system`
string becomes a leading system message.

Formats, tried in this order on the first record of a file that matches one (`column_mapping` renames and
gathers columns before that; `fmt=` skips detection):

- hh_rlhf: `chosen` is a "\\n\\nHuman: … \\n\\nAssistant: …" transcript. The turns both transcripts share are
  the prompt; the last Assistant turns are the completions.
- sharegpt (LLaMA-Factory): a `conversations` list of {from, value} plus `chosen` / `rejected` as one
  {from, value} message (or text). Roles: human/user -> user, gpt/assistant/model -> assistant, system.
- pairwise (judgment tables): two responses (RESPONSE_PAIRS) and labels: a label column (LABEL_KEYS), or
  numbered annotator columns (`annotator1`, `annotator2`, …, read in number order). The prompt is
  `instruction` (or `prompt` / `question`), with `input` appended after a blank line. Labels, one value or a
  list (one per annotator), each a value or an {annotator…, label} object: "a"/"b" (also model_a, response_a,
  or the response column's own name, any case); numbers counted like the response columns: 1/2 for
  *_1/*_2, *1/*2 and *_a/*_b, 0/1 for response_0/response_1 (numeric text such as "2" from CSV too); "tie…"
  is a vote for neither, and so is 0 in an annotator column; an empty annotator cell is no vote. The majority
  picks `chosen`; equal votes reject the row as `annotator_tie`.
- ultrafeedback (UltraFeedback / Argilla): `chosen` / `rejected` as text or message lists, with a pair of
  scores (SCORE_KEYS) at top level or under `metadata`. A text `prompt` that repeats the first user message
  of the message lists is not added twice.
- trl_conversational: `chosen` / `rejected` message lists, explicit `prompt` or implicit (the shared history).
- trl_standard: `prompt` / `chosen` / `rejected` text.

Scores are read in every format where a score pair is present. Where a conversation is split into prompt and
answers, chosen and rejected must agree on everything before their final assistant turns, or the row is
rejected (one of the two histories would otherwise be lost). A value of the wrong type anywhere makes that row
a reject naming the field (RowError), never an exception.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

SCORE_KEYS = (
    ("score_chosen", "score_rejected"),
    ("chosen_score", "rejected_score"),
    ("chosen_rating", "rejected_rating"),
    ("chosen-rating", "rejected-rating"),
    ("rating_chosen", "rating_rejected"),
)
# response column pairs of pairwise tables -> the number a label gives the first one
RESPONSE_PAIRS = {
    ("response_a", "response_b"): 1,
    ("output_1", "output_2"): 1,
    ("response_0", "response_1"): 0,
    ("response_1", "response_2"): 1,
    ("response1", "response2"): 1,
    ("completion_a", "completion_b"): 1,
}
LABEL_KEYS = ("preference", "label", "labels", "annotations", "winner", "choice", "better_response_id")
ANNOTATOR_COLUMN = re.compile(r"annotator_?(\d+)")  # one judge's vote per column: annotator1, annotator_2, ...
INSTRUCTION_KEYS = ("instruction", "prompt", "question")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "system": "system"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class PreferenceFormatError(ValueError):
    """A whole file cannot be read as preference data."""


class RowError(ValueError):
    """One record is unusable; the message names the field, `reason` is its rejects reason."""

    def __init__(self, message: str, reason: str = "unparseable"):
        super().__init__(message)
        self.reason = reason


class Pair(NamedTuple):
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    score_chosen: float | None = None
    score_rejected: float | None = None


# ---- field readers: each raises RowError naming the field, never anything else


def _type(value: Any) -> str:
    return type(value).__name__


def _short(value: Any) -> str:
    """A value for an error message, cut short; huge ints and deep nests cannot even be printed."""
    try:
        return repr(value if isinstance(value, str) else str(value))[:42]
    except (ValueError, RecursionError):
        return f"<{_type(value)}>"


def _check_text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(f"missing field '{field}'")
    if not isinstance(value, str):
        raise RowError(f"field '{field}': expected text, got {_type(value)}")
    return value  # lone surrogates, which polars cannot store, are found when the table is built


def _text(obj: dict, field: str) -> str:
    return _check_text(obj.get(field), field)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RowError(f"field '{field}': expected a number, got {_type(value)}")
    try:
        x = float(value)
    except (ValueError, OverflowError):
        raise RowError(f"field '{field}': {_short(value)} is not a number") from None
    if not math.isfinite(x):
        raise RowError(f"field '{field}': {_short(value)} is not a finite number")
    return x


def _message(m: Any, field: str, roles: dict[str, str] | None = None) -> dict[str, str]:
    if not isinstance(m, dict):
        raise RowError(f"field '{field}': expected a message object, got {_type(m)}")
    role_key, text_key = ("from", "value") if "from" in m or "value" in m else ("role", "content")
    role = _check_text(m.get(role_key), f"{field}.{role_key}")
    content = _check_text(m.get(text_key), f"{field}.{text_key}")
    if roles is not None:
        if role.lower() not in roles:
            raise RowError(f"field '{field}.{role_key}': unknown role {role[:30]!r}; known: {sorted(roles)}")
        role = roles[role.lower()]
    return {"role": role, "content": content}


def _messages(value: Any, field: str, roles: dict[str, str] | None = None) -> list[dict[str, str]]:
    if value is None:
        raise RowError(f"missing field '{field}'")
    if not isinstance(value, list):
        raise RowError(f"field '{field}': expected a list of messages, got {_type(value)}")
    return [_message(m, f"{field}[{i}]", roles) for i, m in enumerate(value)]


def _prompt(value: Any, field: str = "prompt") -> list[dict[str, str]]:
    if isinstance(value, list):
        return _messages(value, field)
    if value is not None and not isinstance(value, str):
        raise RowError(f"field '{field}': expected text or a list of messages, got {_type(value)}")
    return [{"role": "user", "content": _check_text(value, field)}]


def _final_answer(messages: list[dict[str, str]], field: str) -> str:
    if not messages or messages[-1]["role"] != "assistant":
        raise RowError(f"field '{field}': the last message must be the assistant's answer")
    return messages[-1]["content"]


def _join_conversation(prompt: Any, chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], str, str]:
    """Prompt + the history both completions carry; the final answers as text."""
    answers = _final_answer(chosen, "chosen"), _final_answer(rejected, "rejected")
    history = chosen[:-1]
    if history != rejected[:-1]:
        # otherwise one of the two histories would be silently thrown away
        raise RowError("chosen and rejected differ before their final answers; only the last assistant turn may differ")
    if prompt is None:
        head = []
    elif isinstance(prompt, str):
        text = _check_text(prompt, "prompt")
        first_user = next((m["content"] for m in history if m["role"] == "user"), None)
        # UltraFeedback on the Hub repeats the prompt text as the first user message
        head = [] if first_user is not None and first_user.strip() == text.strip() else _prompt(text)
    else:
        head = _prompt(prompt)
    return head + history, *answers


def _scores(obj: dict) -> tuple[float | None, float | None]:
    """The first score pair found (top level, then `metadata`); a pair with a missing half counts as none."""
    if _SCORE_PLACES.isdisjoint(obj):
        return None, None
    places = [obj] + ([obj["metadata"]] if isinstance(obj.get("metadata"), dict) else [])
    for place in places:
        for c, r in SCORE_KEYS:
            if c in place and r in place and (place[c] is not None or place[r] is not None):
                if place[c] is None or place[r] is None:
                    return None, None
                return _number(place[c], c), _number(place[r], r)
    return None, None


_SCORE_PLACES = frozenset([*(k for pair in SCORE_KEYS for k in pair), "metadata"])


def _has_scores(obj: dict) -> bool:
    places = [obj] + ([obj["metadata"]] if isinstance(obj.get("metadata"), dict) else [])
    return any(c in p and r in p for p in places for c, r in SCORE_KEYS)


# ---- parsers: one record -> Pair


def parse_trl_standard(obj: dict) -> Pair:
    return Pair(_prompt(obj.get("prompt")), _text(obj, "chosen"), _text(obj, "rejected"), *_scores(obj))


def parse_trl_conversational(obj: dict) -> Pair:
    chosen, rejected = _messages(obj.get("chosen"), "chosen"), _messages(obj.get("rejected"), "rejected")
    return Pair(*_join_conversation(obj.get("prompt"), chosen, rejected), *_scores(obj))


def parse_ultrafeedback(obj: dict) -> Pair:
    if isinstance(obj.get("chosen"), list) or isinstance(obj.get("rejected"), list):
        return parse_trl_conversational(obj)
    return parse_trl_standard(obj)


def _hh_turns(value: Any, field: str) -> list[dict[str, str]]:
    text = _check_text(value, field)
    parts = HH_TURN.split("\n\n" + text.lstrip())
    if parts[0].strip() or len(parts) < 3:
        raise RowError(f"field '{field}': expected a '\\n\\nHuman: … \\n\\nAssistant: …' transcript")
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def parse_hh_rlhf(obj: dict) -> Pair:
    chosen, rejected = _hh_turns(obj.get("chosen"), "chosen"), _hh_turns(obj.get("rejected"), "rejected")
    return Pair(*_join_conversation(None, chosen, rejected), *_scores(obj))


def _sharegpt_answer(obj: dict, field: str) -> str:
    value = obj.get(field)
    if value is None or isinstance(value, str):
        return _check_text(value, field)
    if not isinstance(value, dict):
        raise RowError(f"field '{field}': expected a {{from, value}} message, got {_type(value)}")
    message = _message(value, field, SHAREGPT_ROLES)
    if message["role"] != "assistant":
        raise RowError(f"field '{field}': expected the assistant's answer, got role '{message['role']}'")
    return message["content"]


def parse_sharegpt(obj: dict) -> Pair:
    prompt = _messages(obj.get("conversations"), "conversations", SHAREGPT_ROLES)
    return Pair(prompt, _sharegpt_answer(obj, "chosen"), _sharegpt_answer(obj, "rejected"), *_scores(obj))


def _response_keys(obj: dict) -> tuple[str, str]:
    pair = next((p for p in RESPONSE_PAIRS if p[0] in obj and p[1] in obj), None)
    if pair is None:
        raise RowError(f"missing response columns: one of {[f'{a}/{b}' for a, b in RESPONSE_PAIRS]}")
    return pair


def _instruction(obj: dict) -> list[dict[str, str]]:
    key = next((k for k in INSTRUCTION_KEYS if obj.get(k) is not None), "instruction")
    text = _text(obj, key)
    extra = obj.get("input")
    if extra is not None and _check_text(extra, "input").strip():
        text = f"{text}\n\n{extra}"
    return [{"role": "user", "content": text}]


def _vote(value: Any, field: str, names: tuple[str, str], base: int) -> int | None:
    """0: first response, 1: second, None: a tie vote."""
    if isinstance(value, dict):  # one annotation object, e.g. {"annotator": "x", "preference": "a"}
        key = next((k for k in LABEL_KEYS if value.get(k) is not None), None)
        if key is None:
            raise RowError(f"field '{field}': annotation without a label ({', '.join(LABEL_KEYS)})")
        value = value[key]
    if isinstance(value, str):
        s = value.strip().lower()
        if s.startswith("tie"):
            return None
        letters = {"a": 0, "b": 1, "model_a": 0, "model_b": 1, "response_a": 0, "response_b": 1,
                   names[0].lower(): 0, names[1].lower(): 1}
        if s in letters:
            return letters[s]
        value = int(s) if re.fullmatch(r"[0-9]", s) else value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value in (base, base + 1):
        return int(value) - base
    raise RowError(f"field '{field}': label {_short(value)} is not one of a, b, {base}, {base + 1}, tie")


def annotator_columns(keys) -> list[str]:
    """The numbered annotator columns among `keys`, in number order."""
    found = [(int(m.group(1)), k) for k in keys if isinstance(k, str) and (m := ANNOTATOR_COLUMN.fullmatch(k))]
    return [k for _, k in sorted(found)]


def _votes(obj: dict, names: tuple[str, str], base: int) -> list[int | None]:
    key = next((k for k in LABEL_KEYS if obj.get(k) is not None), None)
    if key is None:
        columns = annotator_columns(obj)
        if not columns:
            raise RowError(f"missing label: one of {', '.join(LABEL_KEYS)}, or annotator1, annotator2, ...")
        votes = [None if not isinstance(obj[k], bool) and obj[k] in (0, "0") else _vote(obj[k], k, names, base)
                 for k in columns if obj[k] is not None and obj[k] != ""]
        if not votes:
            raise RowError(f"fields {columns}: no labels")
        return votes
    values = obj[key] if isinstance(obj[key], list) else [obj[key]]
    if not values:
        raise RowError(f"field '{key}': no labels")
    return [_vote(v, key, names, base) for v in values]


def parse_pairwise(obj: dict) -> Pair:
    first, second = _response_keys(obj)
    prompt, a, b = _instruction(obj), _text(obj, first), _text(obj, second)
    votes = _votes(obj, (first, second), RESPONSE_PAIRS[(first, second)])
    n_a, n_b = votes.count(0), votes.count(1)
    if n_a == n_b:
        raise RowError(f"annotator tie: {n_a} vote(s) for '{first}', {n_b} for '{second}'", reason="annotator_tie")
    chosen, rejected = (a, b) if n_a > n_b else (b, a)
    return Pair(prompt, chosen, rejected)


def _is_hh(keys: set, rec: dict) -> bool:
    chosen = rec.get("chosen")
    return isinstance(chosen, str) and chosen.lstrip().startswith("Human:") and "\n\nAssistant:" in chosen


def _is_pairwise(keys: set, rec: dict) -> bool:
    return any({a, b} <= keys for a, b in RESPONSE_PAIRS) and (
        any(k in keys for k in LABEL_KEYS) or bool(annotator_columns(keys)))


# name -> (does it match these keys and this record?, parser); detection tries them in this order
FORMATS: dict[str, tuple[Callable[[set, dict], bool], Callable[[dict], Pair]]] = {
    "hh_rlhf": (lambda keys, rec: {"chosen", "rejected"} <= keys and _is_hh(keys, rec), parse_hh_rlhf),
    "sharegpt": (lambda keys, rec: {"conversations", "chosen", "rejected"} <= keys, parse_sharegpt),
    "pairwise": (_is_pairwise, parse_pairwise),
    "ultrafeedback": (lambda keys, rec: {"chosen", "rejected"} <= keys and _has_scores(rec), parse_ultrafeedback),
    "trl_conversational": (
        lambda keys, rec: {"chosen", "rejected"} <= keys and isinstance(rec.get("chosen"), list),
        parse_trl_conversational,
    ),
    "trl_standard": (
        lambda keys, rec: {"prompt", "chosen", "rejected"} <= keys and not isinstance(rec.get("chosen"), list),
        parse_trl_standard,
    ),
}


def _match(record: dict) -> str | None:
    keys = set(record)
    return next((name for name, (matches, _) in FORMATS.items() if matches(keys, record)), None)


def _with_system(obj: dict, pair: Pair) -> Pair:
    system = obj.get("system")
    if system is None or not _check_text(system, "system").strip():
        return pair
    if pair.prompt and pair.prompt[0]["role"] == "system":
        return pair
    return pair._replace(prompt=[{"role": "system", "content": system}] + pair.prompt)


def parse(rec: dict | RowError, parser: Callable[[dict], Pair] | None) -> tuple[Pair | None, RowError | None]:
    if isinstance(rec, RowError):
        return None, rec
    if not isinstance(rec, dict):
        return None, RowError(f"expected a record object, got {_type(rec)}")
    try:
        return _with_system(rec, parser(rec)), None
    except RowError as e:
        return None, e
