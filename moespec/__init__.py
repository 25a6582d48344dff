"""moespec: inference for Mixture-of-Experts models whose experts do not fit on the device."""

from .api import LLM
from .config import EngineConfig, OffloadConfig, SpecDecodeConfig, SpeculationConfig
from .decode.generate import Completion
from .errors import MoespecError

__all__ = ["LLM", "Completion", "EngineConfig", "MoespecError", "OffloadConfig", "SpecDecodeConfig",
           "SpeculationConfig"]
__version__ = "0.1.0"
