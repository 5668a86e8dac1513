"""The reference (naive) inference path: one prompt at a time through the LM's ``generate``.

Slow but plain - every question re-encodes its image and its whole prompt - so it is what the
batched engine (:mod:`model.inference.engine`) is checked against (tests/test_engine.py,
tests/test_default_model.py) and what ``model.bench`` compares the engine's speed with.
"""

from __future__ import annotations

import torch
from PIL import Image

from model.focal import focal_crops
from model.inference.decode import AnswerText
from model.mllm import RegionMLLM

__all__ = ["generate_naive"]


@torch.inference_mode()
def generate_naive(
    model: RegionMLLM, image: Image.Image, boxes: torch.Tensor, question: str, max_new_tokens: int = 24
) -> tuple[str, float]:
    """Encode the image (and the focal crops of its small boxes, as training does), build the
    prompt, call ``generate`` (greedy).

    ``boxes``: ``(N, 4)`` normalised.  Returns (answer, mean token
    probability, EOS included); the answer holds whole characters only, as the engine's
    (:class:`~model.inference.decode.AnswerText`).  The batched engine must give the same answers.
    """
    tok = model.tokenizer
    enc = model.prompts.encode_question(question, num_boxes=len(boxes))
    vision = model.encode_images(model.processor(image).unsqueeze(0))
    crops = focal_crops(image, boxes.reshape(-1, 4), model.cfg.region, model.processor.batch)
    feats = model.region_features(vision, [boxes], [crops])
    ids = torch.tensor([enc.input_ids], device=model.device)
    embeds = model.embed_prompts(ids, vision, feats, [0], [enc.region_order])
    out = model.lm.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[0].tolist()
    probs = [torch.softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    if tok.eos_token_id in tokens:
        cut = tokens.index(tok.eos_token_id)
        tokens, probs = tokens[:cut], probs[: cut + 1]
    score = sum(probs) / max(len(probs), 1)
    return AnswerText(tok, model.prompts.stop_text)(tokens), score
