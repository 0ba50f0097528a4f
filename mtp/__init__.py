"""mtp: multi-token prediction language models and self-speculative decoding."""

from mtp.config import PRESETS, ModelConfig, TrainConfig, preset
from mtp.errors import MTPError
from mtp.generate import GenerationConfig, GenerationOutput  # generate(): mtp.generate.generate
from mtp.losses import head_metrics, mtp_loss_backward, multi_token_targets, naive_loss, parse_loss_weights
from mtp.model import MTPTransformer

__all__ = [
    "PRESETS", "ModelConfig", "TrainConfig", "preset", "MTPError", "MTPTransformer",
    "GenerationConfig", "GenerationOutput",
    "head_metrics", "mtp_loss_backward", "multi_token_targets", "naive_loss", "parse_loss_weights",
]
__version__ = "0.1.0"
