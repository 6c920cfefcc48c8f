"""Launchpad config: the core settings models, as Dagster Config (same fields, defaults, docs).

Dagster's run-config schema has no numeric bounds or cross-field rules, so a run's config is checked against these
models once, when the run starts and before any step runs (`check_run_config`, called from the storage resource's
setup), instead of when each asset builds its config.
"""

import dagster as dg
from pydantic import Field, ValidationError

from orpo_pipeline.config import (CleanSettings, EvalSettings, LmEvalSettings, ModelSettings, PromotionSettings,
                                  ReadSettings, TokenizeSettings, TrainSettings)


class ReadConfig(dg.Config, ReadSettings):
    pass


class CleanConfig(dg.Config, CleanSettings):
    pass


class ModelConfig(dg.Config, ModelSettings):
    pass


class TokenizeConfig(dg.Config, TokenizeSettings):
    pass


class TrainConfig(dg.Config, TrainSettings):
    init_from_champion: bool = Field(
        False, description="Continue from the adapter of the registered model's 'champion' version instead of a fresh "
        "LoRA (a fresh one when there is no champion yet).",
    )


class EvalConfig(dg.Config, EvalSettings):
    pass


class LmEvalConfig(dg.Config, LmEvalSettings):
    pass


class PromotionConfig(dg.Config, PromotionSettings):
    pass
