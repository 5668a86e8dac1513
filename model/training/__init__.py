"""Training: the loop shared by the CLI, the toy world's build and fine-tuning jobs; distributed helpers."""

from model.training.loop import ProgressFn, TrainOptions, hide_image_tokens, lm_only_loss, train
from model.training.new_tokens import lift_untrained_rows, text_token_ids

__all__ = [
    "ProgressFn",
    "TrainOptions",
    "hide_image_tokens",
    "lift_untrained_rows",
    "lm_only_loss",
    "text_token_ids",
    "train",
]
