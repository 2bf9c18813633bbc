"""The Kimi K2 / DeepSeek-V3 model: MLA attention, sigmoid-routed MoE, YaRN RoPE."""

from openk2.model.config import ConfigError, ModelConfig
from openk2.model.hf import CheckpointError, load_hf, save_hf
from openk2.model.params import ParamCount, count_params
from openk2.model.presets import PRESETS, get_preset, preset_names
from openk2.model.transformer import CausalLMOutput, K2Model, build_model

__all__ = [
    "PRESETS", "CausalLMOutput", "CheckpointError", "ConfigError", "K2Model", "ModelConfig", "ParamCount",
    "build_model", "count_params", "get_preset", "load_hf", "preset_names", "save_hf",
]
