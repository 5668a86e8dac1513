"""Input rows of tokens a model never trained are lifted to the trained rows' scale before
fine-tuning (model.training.new_tokens; the job's TRAIN_LIFT_NEW_TOKENS)."""

from __future__ import annotations

import torch

from model.training import lift_untrained_rows, text_token_ids
from tests.model_helpers import tiny_model


def test_only_small_rows_of_needed_tokens_are_lifted_once():
    model = tiny_model(seed=3)
    weight = model.lm.get_input_embeddings().weight
    trained = sorted(text_token_ids(model, ["a small red circle", "left of, above"]))
    new = sorted(text_token_ids(model, ["粉色圆形"]) - set(trained))
    assert trained and new
    with torch.no_grad():
        weight[trained] = torch.randn(len(trained), weight.shape[1]) * 2.0  # trained rows: larger scale
        weight[new] = torch.randn(len(new), weight.shape[1]) * 0.01  # never trained: initial scale
    keep = weight.detach().clone()
    lifted = lift_untrained_rows(model, new + trained[:2], trained)
    assert lifted == new  # a needed token that is trained keeps its row
    mean = keep[trained].mean(dim=0)
    assert torch.allclose(weight[new], keep[new] + mean)
    untouched = [i for i in range(weight.shape[0]) if i not in new]
    assert torch.equal(weight[untouched], keep[untouched])
    assert lift_untrained_rows(model, new, []) == []  # nothing known trained: nothing to compare with


def test_the_job_lifts_the_rows_of_new_scripts_once_per_lineage(tmp_path, tiny_checkpoint):
    """TRAIN_LIFT_NEW_TOKENS: a job on Chinese corrections lifts the rows of their never-trained
    tokens and records them in version.json; the next job of the lineage does not lift them again."""
    from backend.finetune import finetune_project, lineage_data
    from backend.registry import ModelRegistry
    from model.checkpoint import load_model, read_metadata, save_checkpoint
    from model.data.dataset import record_turns
    from tests.test_finetune_sources import jsonl_job
    from toyworld.scenes import SyntheticRecords

    model = load_model(tiny_checkpoint)
    trained = text_token_ids(
        model, [t for r in SyntheticRecords(seed=5, count=12) for qa in record_turns(r) for t in qa]
    )
    with torch.no_grad():  # the earlier data's rows trained to a larger scale than the initial one
        model.lm.get_input_embeddings().weight[sorted(trained)] *= 10.0
    parent = save_checkpoint(model, tmp_path / "parent", metadata={"version": "1.0.0"})
    settings, store = jsonl_job(tmp_path, parent, lambda labels: "粉色圆形", train_lift_new_tokens=True)
    registry = ModelRegistry(settings.model_dir, settings.default_model)
    first = finetune_project(1, settings, store, registry, lineage_data(settings), reason="test")
    new = text_token_ids(model, ["粉色圆形"]) - trained
    assert first["train"]["lifted_tokens"] == len(new) > 0
    assert read_metadata(registry.path(first["version"]))["lifted_tokens"] == sorted(new)
    assert first["decision"] == "promoted"  # tolerance 1.0: the next job's parent is this version
    second = finetune_project(1, settings, store, registry, lineage_data(settings), reason="again")
    assert second["parent"] == first["version"] and second["train"]["lifted_tokens"] == 0
    assert read_metadata(registry.path(second["version"]))["lifted_tokens"] == sorted(new)  # carried on
