"""The synthetic world that builds the embedded default model: scenes of coloured shapes
(:mod:`toyworld.scenes`), CLIP pre-training (:mod:`toyworld.train_clip`), the build
(:mod:`toyworld.build_default`) and its evaluation
(:mod:`toyworld.evaluate`).  It uses the model library; the library never imports it."""

__all__ = ["build_default", "evaluate", "scenes", "train_clip"]
