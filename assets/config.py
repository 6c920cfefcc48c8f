"""Launchpad config: the core settings models, as Dagster Config (same fields, defaults, docs)."""

import dagster as dg

from orpo_pipeline.config import (DataSettings, EvalSettings, LmEvalSettings, ModelSettings, PromotionSettings,
                                  TokenizeSettings, TrainSettings)


class DataConfig(dg.Config, DataSettings):
    pass


class ModelConfig(dg.Config, ModelSettings):
    pass


class TokenizeConfig(dg.Config, TokenizeSettings):
    pass


class TrainConfig(dg.Config, TrainSettings):
    init_from_champion: bool = False  # continue from the champion's adapter instead of a fresh LoRA


class EvalConfig(dg.Config, EvalSettings):
    pass


class LmEvalConfig(dg.Config, LmEvalSettings):
    pass


class PromotionConfig(dg.Config, PromotionSettings):
    pass
