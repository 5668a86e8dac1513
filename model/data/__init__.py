"""Training data: region-text records (:mod:`model.data.converters`: the JSONL format, COCO /
RefCOCO / Visual Genome converters, validation) and model-ready samples
(:mod:`model.data.dataset`).  The submodules are imported on demand: the converters need no torch."""

__all__ = ["converters", "dataset"]
