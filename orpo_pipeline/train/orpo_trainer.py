"""The ORPO trainer: our `transformers.Trainer` subclass over an already tokenized dataset.

It takes TRL's `ORPOConfig` (beta, max_length, disable_dropout on top of TrainingArguments) and logs TRL's ORPO
metric names (`rewards/*`, `logps/*`, `nll_loss`, `log_odds_ratio`, `log_odds_chosen`), so runs read like TRL's;
the loss is ours (orpo_pipeline.train.loss): completion-token NLL, fused with the LM head, each prompt computed once.
TRL's own ORPOTrainer is not subclassed: its constructor re-tokenizes the data, which ours already is (safely
truncated, in TRL's column layout), and nothing here reaches into its internals.

Overridden, all documented extension points of `transformers.Trainer`: `compute_loss`, `log` (adds the ORPO
metrics averaged over the logging interval) and `get_train_dataloader` (length buckets, deterministic per epoch).
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import Trainer
from trl.experimental.orpo import ORPOConfig

from .loss import causal_lm_hidden_and_head, orpo_loss_fused, orpo_loss_from_logits
from .shared_prompt import (
    MASKABLE_ATTENTION,
    SharedPromptBatch,
    completion_hidden,
    decoder_inputs,
    pack_shared_prompt,
)

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ORPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected", "nll_loss", "log_odds_ratio", "log_odds_chosen")  # TRL's names


class PairCollator:
    """Pads TRL's token columns: prompts on the left (they end where the answers start), the rest on the right."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in features[0]:
            if not key.endswith(("_input_ids", "_attention_mask", "_labels")):
                continue
            value = self.pad_token_id if key.endswith("_input_ids") else IGNORE_INDEX if key.endswith("_labels") else 0
            left = key.startswith("prompt")
            rows = [torch.tensor(f[key][::-1] if left else f[key], dtype=torch.long) for f in features]
            padded = pad_sequence(rows, batch_first=True, padding_value=value)
            batch[key] = padded.flip(1) if left else padded
        return batch


def concatenated_inputs(batch: dict[str, torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """TRL's layout without a shared prompt: chosen rows then rejected rows, padded to one width; labels unshifted."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def both(key: str, value: int) -> torch.Tensor:
        return torch.cat([F.pad(batch[f"{side}_{key}"], (0, width - batch[f"{side}_{key}"].shape[1]), value=value)
                          for side in ("chosen", "rejected")])

    return both("input_ids", pad_token_id), both("attention_mask", 0), both("labels", IGNORE_INDEX)


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def call_as_forward(model, fn):
    """Return fn(inner) computed as the forward of `model`, the inner module possibly wrapped by DDP / FSDP.

    The fused loss calls the decoder and reads the LM head weight directly instead of model(...).
    Outside a wrapper's forward, DDP would not arm its gradient all-reduce (each rank would silently
    train its own adapter) and FSDP would not gather sharded weights.
    """
    inner = getattr(model, "module", model)
    saved = inner.__dict__.get("forward")  # accelerate may have put an autocast wrapper here
    inner.forward = lambda *args, **kwargs: fn(inner)
    try:
        return model()
    finally:
        if saved is None:
            del inner.forward
        else:
            inner.forward = saved


def hidden_and_head(model, ids, mask, **decoder_kwargs):
    """causal_lm_hidden_and_head, also when peft's trainable tokens wrap the head (no .bias of its own)."""
    from peft.utils import TrainableTokensWrapper

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, TrainableTokensWrapper):
        return causal_lm_hidden_and_head(model, ids, mask, **decoder_kwargs)
    hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False, **decoder_kwargs).last_hidden_state
    return hidden, head.weight, head.original_module.bias  # .weight has the trained rows merged in


def fused_orpo_loss(model, ids, mask, labels, beta: float):
    hidden, weight, bias = hidden_and_head(model, ids, mask)
    hidden, labels = completion_window(hidden, labels)
    return orpo_loss_fused(hidden, weight, labels, beta, lm_head_bias=bias)


def shared_prompt_orpo_loss(model, packed: SharedPromptBatch, beta: float, fused: bool = True):
    """The ORPO loss over packed rows (prompt computed once); same value as over TRL's concatenated rows."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kw = decoder_inputs(packed, base.config._attn_implementation, base.dtype)
    hidden, weight, bias = hidden_and_head(model, kw.pop("input_ids"), kw.pop("attention_mask"), **kw)
    h, labels = loss_layout(completion_hidden(hidden, packed), packed.labels)
    if fused:
        return orpo_loss_fused(h, weight, labels, beta, lm_head_bias=bias)
    return orpo_loss_from_logits(F.linear(h, weight, bias), labels, beta)


class PretokenizedORPOTrainer(Trainer):
    """ORPO over an already tokenized dataset (TRL's columns), with TRL's config and metric names."""

    # our loss is a mean over its own micro-batch: the Trainer divides it by the accumulation steps
    loss_is_scaled_for_ga = False

    def __init__(self, model, args: ORPOConfig, train_dataset, processing_class, callbacks=None,
                 loss_impl: str = "fused", shared_prompt: bool = True):
        if args.remove_unused_columns:
            raise ValueError("PretokenizedORPOTrainer needs ORPOConfig(remove_unused_columns=False): the token "
                             "columns are not arguments of the model's forward")
        self.beta = args.beta
        self.loss_impl = loss_impl
        self.shared_prompt = shared_prompt_applies(model, shared_prompt)
        self.padding_value = processing_class.pad_token_id
        self.non_pad_tokens = 0
        self._stored_metrics: dict[str, list[float]] = defaultdict(list)
        if args.disable_dropout:
            disable_dropout(model)
        super().__init__(model=model, args=args, data_collator=PairCollator(processing_class.pad_token_id),
                         train_dataset=train_dataset, processing_class=processing_class, callbacks=callbacks)

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        ds, column = self.train_dataset, self.args.length_column_name
        lengths = ds[column] if column in ds.column_names else [
            max(len(c), len(r)) for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"])]
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.args.per_device_train_batch_size, collate_fn=self.data_collator,
            sampler=LengthBucketSampler(lengths, self.args.per_device_train_batch_size, self.args.seed),
            num_workers=self.args.dataloader_num_workers, pin_memory=self.args.dataloader_pin_memory,
            drop_last=self.args.dataloader_drop_last,
        )
        return self.accelerator.prepare(loader)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            n = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            self.non_pad_tokens += int(self.accelerator.gather(n.reshape(1)).sum())  # all ranks: global throughput
        loss, metrics = self.get_batch_loss_metrics(model, inputs, "train" if model.training else "eval")
        for key, value in metrics.items():
            self._stored_metrics[key].append(value)
        return (loss, metrics) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # as TRL's trainers: each ORPO metric averaged over the steps since the last log
        if "loss" in logs:
            for key in [k for k in self._stored_metrics if not k.startswith("eval_")]:
                values = self._stored_metrics.pop(key)
                logs[key] = sum(values) / len(values)
        super().log(logs, start_time)

    def get_batch_loss_metrics(self, model, batch, train_eval="train"):
        """Our ORPO loss (completion-token NLL), fused unless `loss_impl` says otherwise; TRL's metric names."""
        fused = self.loss_impl == "fused"
        with torch.autocast(self.accelerator.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            if self.shared_prompt:
                packed = pack_shared_prompt(batch, self.padding_value)
                out = call_as_forward(model, lambda m: shared_prompt_orpo_loss(m, packed, self.beta, fused))
            else:
                ids, mask, labels = concatenated_inputs(batch, self.padding_value)
                if fused:
                    out = call_as_forward(model, lambda m: fused_orpo_loss(m, ids, mask, labels, self.beta))
                else:
                    logits = model(ids, attention_mask=mask, use_cache=False).logits
                    out = orpo_loss_from_logits(logits, labels, self.beta)
        chosen_r, rejected_r = self.beta * out.chosen_logps.detach(), self.beta * out.rejected_logps.detach()
        # every rank computes the same mean over all ranks' pairs, so rank 0's log speaks for the whole batch
        gather = lambda t: self.accelerator.gather_for_metrics(t.detach().float()).mean().item()  # noqa: E731
        values = (chosen_r, rejected_r, (chosen_r > rejected_r).float(), chosen_r - rejected_r, out.chosen_logps,
                  out.rejected_logps, out.nll_loss, out.log_odds_ratio, out.log_odds_chosen)
        prefix = "eval_" if train_eval == "eval" else ""
        return out.loss, {prefix + k: gather(v) for k, v in zip(ORPO_METRICS, values)}


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar lengths, in random order, so a batch pads only to its own longest row.

    Shuffle, sort within mega-batches of up to `mega` batches (transformers' LengthGroupedSampler uses only
    len/4 batch-sizes on small sets, which leaves most of the padding), cut into batches, shuffle the batches;
    the longest goes first so an out-of-memory shows at step one. The one short batch stays last so the
    DataLoader's own batching lines up with ours. The order is a function of (seed, epoch) only: the same on every
    rank, and the same after a resume.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, mega: int = 64):
        self.lengths, self.batch_size, self.seed, self.mega, self.epoch = list(lengths), batch_size, seed, mega, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        # the Trainer sets it before each epoch (also when resuming), so a resumed run sees the same order
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order, bs = torch.randperm(len(self.lengths), generator=g).tolist(), self.batch_size
        batches = []
        for i in range(0, len(order), bs * self.mega):
            group = sorted(order[i:i + bs * self.mega], key=self.lengths.__getitem__, reverse=True)
            batches += [group[j:j + bs] for j in range(0, len(group), bs)]
        short = [batches.pop()] if batches and len(batches[-1]) < bs else []
        batches = [batches[k] for k in torch.randperm(len(batches), generator=g).tolist()]
        if batches:
            first = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            batches[0], batches[first] = batches[first], batches[0]
        return iter([k for b in batches + short for k in b])


def shared_prompt_applies(model, wanted: bool) -> bool:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if wanted and impl not in MASKABLE_ATTENTION:
        log.info("shared_prompt is off: attention '%s' takes no custom mask (only %s do)", impl, MASKABLE_ATTENTION)
    return wanted and impl in MASKABLE_ATTENTION


def completion_window(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep only positions that predict a completion token, so the LM head never runs on the prompt.

    Returns tensors in the loss's unshifted convention: one dummy trailing hidden column and one
    ignored leading label column, so hidden[:, :-1] lines up with labels[:, 1:] again.
    """
    target = labels[:, 1:] != -100  # completions are contiguous: prompt, answer, padding
    counts = target.sum(1)
    width = max(int(counts.max()), 1)
    start = target.int().argmax(1)
    offsets = torch.arange(width, device=labels.device)
    idx = (start[:, None] + offsets[None]).clamp(max=labels.shape[1] - 2)
    h = hidden.gather(1, idx[..., None].expand(-1, -1, hidden.shape[-1]))
    lab = labels[:, 1:].gather(1, idx).masked_fill(offsets[None] >= counts[:, None], -100)
    return loss_layout(h, lab)


def loss_layout(h: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h[:, k] predicts targets[:, k] -> the losses' unshifted convention (h[:, :-1] vs labels[:, 1:])."""
    h = torch.cat([h, h.new_zeros(h.shape[0], 1, h.shape[2])], dim=1)
    lab = torch.cat([targets.new_full((targets.shape[0], 1), -100), targets], dim=1)
    return h, lab
