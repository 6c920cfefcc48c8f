"""Tokenization as Ray Data over the cleaned parquet partitions: the same rows, ids and drops as `tokenize_pairs`.

Each Ray Data batch goes through `tokenize_pairs` itself (every pair is tokenized on its own, so a batch
boundary changes nothing); the blocks come back in input order (preserve_order) and are joined into the
same Arrow dataset the local path builds. A batch's drops and truncation counts travel as one extra row
marked in a `_meta` column, so one pass carries both.

As a Ray job (ComputeResource.ray_address with ray_tokenize): `python -m orpo_pipeline.train.ray_tokenize`
with the Pipes extra "tokenize_spec" writes the DatasetDict to spec["output_dir"] and reports the drop and
truncation counts as a Pipes custom message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path

import pyarrow as pa

from .tokenize import TokenizedSplit

log = logging.getLogger(__name__)

META = "_meta"
READ_COLUMNS = ["prompt", "chosen", "rejected", "content_hash", "source_file", "source_row"]


class TokenizeBatch:
    """Ray Data callable class: loads the tokenizer once per actor, tokenizes each batch with tokenize_pairs."""

    def __init__(self, tokenizer_dir: str, chat_template: str, kwargs: dict):
        from transformers import AutoTokenizer

        from .trainer import set_chat_template

        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        set_chat_template(self.tokenizer, chat_template)  # the same call the trainer makes: the same ids
        self.kwargs = kwargs

    def __call__(self, batch: pa.Table) -> pa.Table:
        import polars as pl

        from .tokenize import tokenize_pairs

        split = tokenize_pairs(pl.from_arrow(batch), self.tokenizer, **self.kwargs)
        table = split.dataset.data.table
        meta = json.dumps({"dropped": split.dropped, "truncated_prompt": split.truncated_prompt,
                           "truncated_completion": split.truncated_completion})
        filler = pa.table({f.name: pa.array([[] if pa.types.is_list(f.type) else ("" if pa.types.is_string(f.type)
                                                                                   else 0)], f.type)
                           for f in table.schema})
        rows = table.append_column(META, pa.nulls(len(table), pa.string()))
        return pa.concat_tables([rows, filler.append_column(META, pa.array([meta], pa.string()))])


def tokenize_with_ray_data(paths: list[str], tokenizer_dir: str, chat_template: str = "", *, batch_rows: int = 1024,
                           concurrency: int = 2, num_cpus: float = 1, **kwargs) -> TokenizedSplit:
    """tokenize_pairs over the rows of `paths` (parquet files or URIs, in this order), run as Ray Data.

    Needs a connected Ray driver (ray.init). `concurrency` tokenizer actors of `num_cpus` each (leave CPUs for
    the parquet reads). kwargs are tokenize_pairs' length settings.
    """
    import datasets
    import pyarrow.compute as pc
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the trainer's data order is the cleaned tables' order
    ds = ray.data.read_parquet(paths, columns=READ_COLUMNS)
    out = ds.map_batches(TokenizeBatch, fn_constructor_kwargs={"tokenizer_dir": tokenizer_dir,
                                                               "chat_template": chat_template, "kwargs": kwargs},
                         batch_format="pyarrow", batch_size=batch_rows, concurrency=concurrency, num_cpus=num_cpus,
                         zero_copy_batch=True)
    blocks = [b for b in ray.get(out.to_arrow_refs()) if b.num_rows]
    table = pa.concat_tables(blocks)
    is_meta = pc.is_valid(table[META])
    # one chunk per column, as the local path builds it (the digest hashes the record-batch layout too)
    rows = table.filter(pc.invert(is_meta)).drop_columns([META]).combine_chunks()
    split = TokenizedSplit(dataset=datasets.Dataset(rows))
    for meta in table.filter(is_meta)[META].to_pylist():
        m = json.loads(meta)
        split.dropped += m["dropped"]
        split.truncated_prompt += m["truncated_prompt"]
        split.truncated_completion += m["truncated_completion"]
    return split


def main(argv: list[str] | None = None) -> None:
    """Ray job: tokenize the spec's train/eval parquet files and save the DatasetDict into spec['output_dir']."""
    import datasets
    import ray

    try:
        from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR, open_dagster_pipes
    except ImportError:
        open_dagster_pipes = None
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--args-json", type=Path, help="the spec; under Dagster Pipes it is an extra")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    piped = open_dagster_pipes is not None and DAGSTER_PIPES_CONTEXT_ENV_VAR in os.environ
    with open_dagster_pipes() if piped else nullcontext(None) as pipes:
        spec = json.loads(args.args_json.read_text()) if args.args_json else pipes.get_extra("tokenize_spec")
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"))
        splits = {s: tokenize_with_ray_data(paths, spec["tokenizer_dir"], spec["chat_template"],
                                            concurrency=spec.get("concurrency", 2), num_cpus=spec.get("num_cpus", 1),
                                            **spec["kwargs"])
                  for s, paths in spec["paths"].items()}
        datasets.DatasetDict({s: t.dataset for s, t in splits.items()}).save_to_disk(spec["output_dir"])
        summary = {s: {"rows": len(t.dataset), "dropped": t.dropped, "truncated_prompt": t.truncated_prompt,
                       "truncated_completion": t.truncated_completion} for s, t in splits.items()}
        if pipes is not None:
            pipes.report_custom_message({"tokenized": summary})
        log.info("tokenized %s", {s: (x["rows"], len(x["dropped"])) for s, x in summary.items()})


if __name__ == "__main__":
    main()
