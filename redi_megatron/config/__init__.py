"""Run configuration: the dataclass schema (``schema``) and the YAML recipe loader (``loader``)."""
from redi_megatron.config.loader import (
                                         apply_overrides,
                                         dump_yaml,
                                         from_dict,
                                         load_config,
                                         parse_override,
                                         save_resolved,
                                         to_dict,
)
from redi_megatron.config.schema import (
                                         CheckpointConfig,
                                         CollapseConfig,
                                         DataConfig,
                                         LoggingConfig,
                                         LossConfig,
                                         OptimizerConfig,
                                         RunConfig,
                                         TrainConfig,
)

__all__ = [
    "RunConfig", "DataConfig", "LossConfig", "OptimizerConfig", "TrainConfig", "CheckpointConfig",
    "CollapseConfig", "LoggingConfig",
    "load_config", "apply_overrides", "parse_override", "from_dict", "to_dict", "dump_yaml", "save_resolved",
]
