"""Training: the loop shared by the CLI, the toy world's build and fine-tuning jobs; distributed helpers."""

from model.training.loop import ProgressFn, TrainOptions, hide_image_tokens, lm_only_loss, train

__all__ = ["ProgressFn", "TrainOptions", "hide_image_tokens", "lm_only_loss", "train"]
