"""A run's configuration: typed dataclasses (schema), YAML + overrides (loading), rules (validation).

Floors: parsing (generic dict -> dataclass machinery) < schema < validation < loading.
"""

from megacredit.config.loading import (
    config_to_dict,
    config_to_yaml,
    load_config,
    read_user_config,
    replace,
    resolve_config,
    save_config,
)
from megacredit.config.parsing import ConfigError, ConfigWarning
from megacredit.config.schema import (
    BUILTIN_MODELS,
    AlgorithmConfig,
    CheckpointConfig,
    CreditConfig,
    DataConfig,
    EnvConfig,
    LamScheduleConfig,
    LoggingConfig,
    MegacreditConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RLSDConfig,
    RolloutConfig,
    SDPOConfig,
    TeacherConfig,
    TinyModelConfig,
    TrainingConfig,
    ValidationConfig,
)
from megacredit.config.validation import check_world_size, validate_against_model, validate_config

__all__ = [
    "AlgorithmConfig", "BUILTIN_MODELS", "CheckpointConfig", "ConfigError", "ConfigWarning",
    "CreditConfig", "DataConfig", "EnvConfig", "LamScheduleConfig", "LoggingConfig", "MegacreditConfig",
    "ModelConfig", "OptimizerConfig", "ParallelConfig", "RLSDConfig", "RolloutConfig", "SDPOConfig",
    "TeacherConfig", "TinyModelConfig", "TrainingConfig", "ValidationConfig", "check_world_size",
    "config_to_dict", "config_to_yaml", "load_config", "read_user_config", "replace", "resolve_config",
    "save_config", "validate_against_model", "validate_config",
]
