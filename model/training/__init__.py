"""Training: the loop shared by the CLI, the toy world's build and fine-tuning jobs; distributed helpers."""

from model.training.loop import ProgressFn, hide_image_tokens, lm_only_loss, train

__all__ = ["ProgressFn", "hide_image_tokens", "lm_only_loss", "train"]
