"""``python -m model.convert gpt4roi``: official key names and layouts at reduced sizes (merged and
delta, .bin and safetensors), full-size 7B/13B key/shape plans on the meta device, the vision
tower (Hugging Face CLIP -> open_clip, QuickGELU, preprocessing) and the GPT4RoI prompt template."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.checkpoint import load_model, read_metadata
from model.config import VisionConfig, load_model_config
from model.convert.__main__ import main as convert_main
from model.convert.clip import VisionSourceError, check_hf_matches_tower
from model.convert.gpt4roi import (
    GPT4ROI_TOKENS,
    model_config,
    plan_conversion,
    target_key,
    target_shapes,
)
from model.convert.shards import ConversionError
from model.vision import ImageProcessor, VisionTower, build_visual
from tests.gpt4roi_fake import (
    SPM_VOCAB,
    TINY_OPEN_CLIP,
    llava_config,
    make_delta,
    make_gpt4roi,
    make_hf_clip,
    official_layout,
)

FULL = {
    "7b": {"hidden": 4096, "layers": 32, "heads": 32, "inter": 11008},
    "13b": {"hidden": 5120, "layers": 40, "heads": 40, "inter": 13824},
}
IDS = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=32000)


def read_source(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.bin")):
        state.update(torch.load(f, weights_only=True))
    from safetensors.torch import load_file

    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(f))
    return state


def convert(*args: str) -> int:
    return convert_main(["gpt4roi", *args, "--open-clip-model", TINY_OPEN_CLIP])


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_hf_clip(tmp_path_factory.mktemp("clip") / "clip-vit")


@pytest.fixture(scope="module", params=["bin", "safetensors"])
def merged(request, tmp_path_factory, clip_dir):
    """(source folder, its tensors, converted folder) for each shard format."""
    root = tmp_path_factory.mktemp(f"gpt4roi-{request.param}")
    state = make_gpt4roi(root / "merged", request.param)
    assert (
        convert("--merged", str(root / "merged"), "--vision", str(clip_dir), "--out", str(root / "out")) == 0
    )
    return root / "merged", state, root / "out"


# ---------------------------------------------------------------------- full-size plans
@pytest.mark.parametrize("size", ["7b", "13b"])
def test_full_size_plan_maps_every_key(size):
    """Official 7B/13B layouts (vocab 32006, CLIP ViT-L/14): every source tensor has a target of
    the same shape and every target a source; only the rotary buffers are derived."""
    f = FULL[size]
    source = official_layout(f["hidden"], f["layers"], f["inter"], 32006, 1024, inv_freq_dim=128)
    cfg = model_config(
        llava_config(f["hidden"], f["layers"], f["heads"], f["inter"], 32006, 1024),
        source,
        IDS,
        "ViT-L-14-quickgelu",
        f"gpt4roi-{size}",
    )
    expected = target_shapes(cfg)
    plan = plan_conversion(source, expected)
    assert len(plan.order) == len(expected) == len(source) - f["layers"]
    assert sorted(plan.derived) == sorted(k for k in source if k.endswith("inv_freq"))
    assert cfg.vision.region_layers == [14, 17, 20, 23]
    assert cfg.region.level_sizes == [128, 64, 32, 16] and cfg.region.gn_groups == 64
    assert cfg.region.roi_output_size == 14 and cfg.region.num_fuse == 5
    ours = load_model_config("gpt4roi-7b")
    assert cfg.region == ours.region and cfg.vision.open_clip_model == ours.vision.open_clip_model
    region = [t for _, t in plan.order if t.startswith(("region_encoder.", "projector."))]
    assert len(region) == 45
    if size == "7b":  # the reference's figure for the spi_module (45 tensors with the projector's 2)
        spi = sum(torch.Size(expected[t]).numel() for t in region if t.startswith("region_encoder."))
        assert spi == 299_142_912 and torch.Size(expected["projector.weight"]).numel() == 4096 * 1024
    # a delta against a LLaMA base of 32000 rows plans too
    base = {k: v for k, v in source.items() if not k.startswith(("model.spi_module.", "model.mm_projector."))}
    base["model.embed_tokens.weight"] = base["lm_head.weight"] = (32000, f["hidden"])
    plan_conversion(source, expected, base)


def test_renames_of_the_reference():
    assert target_key("model.spi_module.mlvl_fuse.fuse_convs.3.conv.weight") == (
        "region_encoder.mlvl_fuse.fuse_convs.3.0.weight"
    )
    assert (
        target_key("model.spi_module.mlvl_fuse.fuse_convs.0.gn.bias")
        == "region_encoder.mlvl_fuse.fuse_convs.0.1.bias"
    )
    assert target_key("model.spi_module.roi_align.updims.weight") == "region_encoder.updims.weight"
    assert target_key("model.spi_module.roi_align.pconvs.2.bias") == "region_encoder.roi_align.pconvs.2.bias"
    assert target_key("model.mm_projector.bias") == "projector.bias"
    assert target_key("lm_head.weight") == "lm.lm_head.weight"
    assert target_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None


def _tiny_plan_inputs():
    source = official_layout(64, 2, 128, 306, 32, fuse=32, roi=2, pos_hidden=16, region_hidden=48)
    ids = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=SPM_VOCAB)
    cfg = model_config(llava_config(64, 2, 4, 128, 306, 32), source, ids, TINY_OPEN_CLIP, "t")
    return source, target_shapes(cfg)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda s: s.update({"model.spi_module.extra.weight": (4,)}), "model.spi_module.extra.weight"),
        (lambda s: s.update({"vision_tower.weight": (4,)}), "vision_tower.weight"),
        (
            lambda s: s.pop("model.spi_module.roi_align.pconvs.1.bias"),
            "region_encoder.roi_align.pconvs.1.bias",
        ),
        (lambda s: s.pop("lm_head.weight"), "lm.lm_head.weight"),
        (lambda s: s.update({"model.norm.weight": (63,)}), "model.norm.weight"),
    ],
)
def test_unknown_missing_or_misshaped_key_is_named(edit, named):
    source, expected = _tiny_plan_inputs()
    edit(source)
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        plan_conversion(source, expected)


def test_delta_checks_name_the_key():
    source, expected = _tiny_plan_inputs()
    base = {k: v for k, v in source.items() if not k.startswith(("model.spi_module.", "model.mm_projector."))}
    base["model.embed_tokens.weight"] = base["lm_head.weight"] = (300, 64)
    plan_conversion(source, expected, base)
    with pytest.raises(ConversionError, match=r"base tensor 'model\.extra' is not in the delta"):
        plan_conversion(source, expected, {**base, "model.extra": (3,)})
    missing = dict(base)
    missing.pop("model.norm.weight")
    with pytest.raises(ConversionError, match=r"delta tensor 'model\.norm\.weight' has no base tensor"):
        plan_conversion(source, expected, missing)


# ---------------------------------------------------------------------- reduced-size conversions
def test_merged_conversion_loads_every_tensor_unchanged(merged):
    src_dir, state, out = merged
    model = load_model(out)
    own = model.state_dict()
    for key, value in state.items():
        target = target_key(key)
        if target is not None:
            assert torch.equal(own[target].half(), value), key
    assert {k for k in own if not k.startswith("vision.")} == {target_key(k) for k in state} - {None}
    tok = model.tokenizer
    assert [tok.convert_tokens_to_ids(t) for t in GPT4ROI_TOKENS] == list(range(SPM_VOCAB, SPM_VOCAB + 6))
    assert json.loads((src_dir / "added_tokens.json").read_text()) == {
        t: tok.convert_tokens_to_ids(t) for t in GPT4ROI_TOKENS
    }
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision"]["open_clip_model"] == TINY_OPEN_CLIP and cfg["vision"]["preprocess"] == "gpt4roi"
    assert cfg["prompt"]["template"] == "gpt4roi_v0" and cfg["lm"]["hf_config"]["model_type"] == "llama"
    assert cfg["lm"]["hf_config"]["pad_token_id"] == SPM_VOCAB  # not the source config's -1
    assert read_metadata(out)["source"]["kind"] == "merged"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_delta_conversion_is_apply_delta(tmp_path, clip_dir):
    merged_state = make_gpt4roi(tmp_path / "reference", "bin", seed=5)
    delta, base = make_delta(merged_state, tmp_path / "delta", tmp_path / "base", "safetensors")
    rc = convert("--delta", str(tmp_path / "delta"), "--base", str(tmp_path / "base"), "--vision",
                 str(clip_dir), "--out", str(tmp_path / "out"), "--dtype", "fp32")  # fmt: skip
    assert rc == 0
    own = load_model(tmp_path / "out").state_dict()
    for key, d in delta.items():
        target = target_key(key)
        if target is None:
            continue
        want = d.half().clone()  # apply_delta.py: fp16, base rows only, modules absolute
        if key in base and base[key].shape == d.shape:
            want = want + base[key].half()
        elif key in base:
            want[: base[key].shape[0]] += base[key].half()
        assert torch.equal(own[target], want.float()), key
        assert torch.allclose(own[target], merged_state[key].float(), atol=1e-3), key
    rows = own["lm.model.embed_tokens.weight"][SPM_VOCAB:]
    assert torch.equal(rows, merged_state["model.embed_tokens.weight"][SPM_VOCAB:].float())
    assert read_metadata(tmp_path / "out")["source"]["kind"] == "delta"
    # The delta's folder is as usable as the merged one's: model.predict and a stage-2 step.
    from model.predict import main as predict_main
    from model.train import main as train_main

    Image.linear_gradient("L").resize((90, 60)).convert("RGB").save(tmp_path / "img.png")
    rc = predict_main([str(tmp_path / "img.png"), "What is <region1>?", "--box", "5,5,40,40", "--model",
                       str(tmp_path / "out"), "--max-new-tokens", "3", "--dtype", "bf16"])  # fmt: skip
    assert rc == 0
    record = {"image": "img.png", "width": 90, "height": 60, "boxes": [[5, 5, 40, 40]],
              "conversations": [{"from": "human", "value": "What is <region1>?"},
                                {"from": "gpt", "value": "a grey region"}],
              "source": "labelstudio", "id": "d1"}  # fmt: skip
    (tmp_path / "data.jsonl").write_text((json.dumps(record) + "\n") * 2)
    rc = train_main(["--init", str(tmp_path / "out"), "--data", str(tmp_path / "data.jsonl"), "--stage", "2",
                     "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "tuned")])  # fmt: skip
    assert rc == 0 and load_model(tmp_path / "tuned").cfg.prompt.template == "gpt4roi_v0"


def test_conversion_refuses_bad_sources(tmp_path, clip_dir):
    src = tmp_path / "merged"
    make_gpt4roi(src, "safetensors")
    out = str(tmp_path / "out")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "vocab_size": 400}))
    assert convert("--merged", str(src), "--vision", str(clip_dir), "--out", out) == 1
    (src / "config.json").write_text(json.dumps({**cfg, "mm_hidden_size": 48}))
    assert convert("--merged", str(src), "--vision", str(clip_dir), "--out", out) == 1
    (src / "config.json").write_text(json.dumps(cfg))
    added = json.loads((src / "added_tokens.json").read_text())
    swapped = {**added, "<im_start>": added["<im_end>"], "<im_end>": added["<im_start>"]}
    (src / "added_tokens.json").write_text(json.dumps(swapped))
    assert convert("--merged", str(src), "--vision", str(clip_dir), "--out", out) == 1
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------- vision
def test_hf_clip_converted_matches_transformers(clip_dir):
    """open_clip tower from a Hugging Face CLIPVisionModel folder gives the same block outputs."""
    from transformers import CLIPVisionModel

    hf = CLIPVisionModel.from_pretrained(str(clip_dir)).eval()
    tower = VisionTower(VisionConfig(open_clip_model=TINY_OPEN_CLIP, checkpoint=str(clip_dir), width=32,
                                     image_token_layer=-2, region_layers=[2, 5, 8, 11]))  # fmt: skip
    assert tower.quick_gelu and tower.cfg.image_size == 56
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
    feats = tower(pixels)
    torch.testing.assert_close(feats.image_tokens, hidden[-2][:, 1:], atol=2e-5, rtol=1e-4)
    for level, idx in zip(feats.levels, [2, 5, 8, 11]):
        want = hidden[idx][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(level, want, atol=2e-5, rtol=1e-4)


def test_gelu_tower_refuses_quickgelu_weights(clip_dir):
    visual = build_visual(TINY_OPEN_CLIP)
    check_hf_matches_tower({"hidden_act": "quick_gelu", "hidden_size": 32}, visual, TINY_OPEN_CLIP)
    with pytest.raises(VisionSourceError, match="activation gelu vs QuickGELU"):
        check_hf_matches_tower({"hidden_act": "gelu"}, visual, TINY_OPEN_CLIP)
    with pytest.raises(VisionSourceError, match="num_hidden_layers"):
        build_visual("roi-vit-test", clip_dir)
    assert load_model_config("gpt4roi-7b").vision.open_clip_model == "ViT-L-14-quickgelu"


def test_image_size_not_fitting_the_tower_is_refused_at_build():
    with pytest.raises(ValueError, match=r"image_size 112 does not match .* takes 56 px"):
        VisionTower(VisionConfig(open_clip_model="roi-vit-test", image_size=112, width=32))
    tower = VisionTower(VisionConfig(open_clip_model="roi-vit-test", width=32))
    assert tower.cfg.image_size == 56 and tower.cfg.interpolation == "bicubic"
    assert tower.cfg.mean == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_gpt4roi_preprocessing_is_the_official_demo():
    """Short side to 56 without crop (CLIPImageProcessor), then bilinear to 56x56."""
    from transformers import CLIPImageProcessor

    cfg = VisionConfig(image_size=56, mean=[0.48145466, 0.4578275, 0.40821073],
                       std=[0.26862954, 0.26130258, 0.27577711], preprocess="gpt4roi")  # fmt: skip
    image = Image.linear_gradient("L").resize((150, 90)).convert("RGB")
    hf = CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_convert_rgb=True
    )
    pixels = hf.preprocess(image, do_center_crop=False, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (56, 93)
    want = F.interpolate(pixels, (56, 56), mode="bilinear", align_corners=False)[0]
    got = ImageProcessor(cfg)(image)
    assert got.shape == (3, 56, 56)
    torch.testing.assert_close(got, want, atol=0.02, rtol=0)


# ---------------------------------------------------------------------- using a converted folder
def test_converted_folder_predicts_trains_and_serves(merged, tmp_path, capsys):
    """The folder is what model.predict, model.train --stage 2 and the backend's /predict load."""
    from backend.app import create_app
    from backend.serving import ModelHolder
    from model.predict import main as predict_main
    from model.train import main as train_main
    from tests.test_backend_app import CAPTION_XML, ls_task, make_settings, predict_payload, rect

    src_dir, _, out = merged
    if not any(src_dir.glob("*.bin")):
        pytest.skip("the safetensors variant converts to the same folder layout")
    image = Image.linear_gradient("L").resize((90, 60)).convert("RGB")
    image.save(tmp_path / "img.png")
    rc = predict_main([str(tmp_path / "img.png"), "What is <region1>?", "--box", "5,5,40,40",
                       "--model", str(out), "--max-new-tokens", "3", "--device", "cpu"])  # fmt: skip
    assert rc == 0 and "confidence" in capsys.readouterr().err
    record = {"image": "img.png", "width": 90, "height": 60, "boxes": [[5, 5, 40, 40], [30, 10, 80, 55]],
              "conversations": [{"from": "human", "value": "What is <region1>?"},
                                {"from": "gpt", "value": "a grey region"},
                                {"from": "human", "value": "And <region2>?"},
                                {"from": "gpt", "value": "a lighter one"}],
              "source": "labelstudio", "id": "r1"}  # fmt: skip
    (tmp_path / "data.jsonl").write_text((json.dumps(record) + "\n") * 4)
    tuned = tmp_path / "tuned"
    rc = train_main(["--init", str(out), "--data", str(tmp_path / "data.jsonl"), "--stage", "2",
                     "--steps", "2", "--batch-size", "2", "--out", str(tuned)])  # fmt: skip
    assert rc == 0 and read_metadata(tuned)["parent"] == "1.0.0"
    assert load_model(tuned).cfg.prompt.template == "gpt4roi_v0"
    settings = make_settings(tmp_path, out)
    holder = ModelHolder(settings)
    client = create_app(settings, holder).test_client()
    task = ls_task(1, [rect("a0", (5, 5, 40, 40), 90, 60)], image=_data_url(image))
    try:
        resp = client.post("/predict", json=predict_payload([task], CAPTION_XML))
    finally:
        holder.stop()  # the registry watcher would outlive the test's folders
    assert resp.status_code == 200, resp.data[:300]
    (prediction,) = resp.get_json()["results"]
    assert prediction["model_version"] == "1.0.0"
    assert {(r["id"], r["from_name"]) for r in prediction["result"]} >= {("a0", "bbox"), ("a0", "caption")}


def _data_url(image: Image.Image) -> str:
    import base64

    from tests.model_helpers import png_bytes

    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


# ---------------------------------------------------------------------- prompt templates
def test_gpt4roi_template_ids_equal_the_whole_conversation(merged):
    """Segment by segment, the ids are those of the official conversation string tokenised at
    once (train.py's _add_speaker_and_signal); answers end with "\\n###", not EOS."""
    from model.prompt import PromptBuilder

    _, _, out = merged
    model = load_model(out)
    tok, cfg = model.tokenizer, model.cfg.prompt
    builder = PromptBuilder(tok, cfg, num_image_tokens=4)
    turns = [("What is <region1>?", "a red square"), ("Is <region2> left of <region1>?", "yes")]
    enc = builder.encode_conversation(turns, num_boxes=2)
    image = "<im_start>" + "<im_patch>" * 4 + "<im_end>"
    text = (f"{cfg.system}\n\n### Human: {cfg.image_intro.replace('<image>', image)}\n"
            "What is region1 <bbox>?\n### Assistant: a red square\n"
            "### Human: Is region2 <bbox> left of region1 <bbox>?\n### Assistant: yes\n###")  # fmt: skip
    assert enc.input_ids == tok(text).input_ids
    assert tok.eos_token_id not in enc.input_ids and enc.region_order == [0, 1, 0]
    answers = tok.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100])
    assert answers.replace(" ", "") == "aredsquare\n###yes\n###"
    assert (
        builder.stop_text == "###"
        and builder.decode(tok(" a red square\n### Human").input_ids[1:]) == "a red square"
    )
    question = builder.prefix_ids + builder.question_ids("What is <region1>?", first=True, num_boxes=1)[0]
    assert question == tok(text.split(" a red square")[0]).input_ids


def test_chat_template_and_default_template():
    """``chat_template`` follows the tokenizer's own template; ``roi_v0`` (the default) still ends
    answers with EOS."""
    from model.config import PromptConfig
    from model.prompt import PromptBuilder
    from tests.model_helpers import tiny_tokenizer

    tok = tiny_tokenizer()
    default = PromptBuilder(tok, PromptConfig(), num_image_tokens=2)
    assert default.answer_ids("a cat")[-1] == tok.eos_token_id
    from transformers import PreTrainedTokenizerFast

    chat = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>", pad_token="[PAD]"
    )
    chat.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    builder = PromptBuilder(
        chat, PromptConfig(system="Be brief.", template="chat_template"), num_image_tokens=2
    )
    enc = builder.encode_conversation([("What is <region1>?", "a cat")], num_boxes=1)
    image = "<im_start><im_patch><im_patch><im_end>"
    text = (f"<|system|>\nBe brief.</s>\n<|user|>\nThe {image} provides an overview of the picture.\n"
            "What is region1 <bbox>?</s>\n<|assistant|>\na cat</s>\n")  # fmt: skip
    assert enc.input_ids == chat(text, add_special_tokens=False).input_ids
    assert chat.decode([i for i, lab in zip(enc.input_ids, enc.labels) if lab != -100]) == "a cat</s>\n"
    assert builder.stop_text == "</s>"


def test_serve_sh_answers_with_a_converted_folder(merged, tmp_path):
    """``scripts/serve.sh`` (gunicorn) seeded with the converted folder answers /predict."""
    import os
    import signal
    import subprocess
    import time

    import requests

    from tests.redis_helpers import TEST_REDIS_URL
    from tests.test_backend_app import CAPTION_XML, ls_task, predict_payload, rect
    from tests.test_distributed import free_port
    from tests.test_serve_settings import REPO, _env

    src_dir, _, out = merged
    if not any(src_dir.glob("*.bin")):
        pytest.skip("one format is enough for the server")
    port = free_port()
    env = _env(HOST="127.0.0.1", PORT=str(port), MODEL_DIR=str(tmp_path / "models"),
               DATA_DIR=str(tmp_path / "data"), DEFAULT_MODEL=str(out), REDIS_URL=TEST_REDIS_URL,
               KEY_PREFIX=f"test-convert-{port}", OMP_NUM_THREADS="1", WEB_THREADS="2")  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(["bash", "scripts/serve.sh"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        loaded = False
        while not loaded and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                loaded = requests.get(f"{base}/health", timeout=5).json().get("loaded") is True
            except (requests.RequestException, ValueError):
                pass
            if not loaded:
                time.sleep(0.5)
        assert loaded, (tmp_path / "serve.log").read_text()[-3000:]
        image = Image.linear_gradient("L").resize((90, 60)).convert("RGB")
        task = ls_task(1, [rect("a0", (5, 5, 40, 40), 90, 60)], image=_data_url(image))
        resp = requests.post(f"{base}/predict", json=predict_payload([task], CAPTION_XML), timeout=300)
        assert resp.status_code == 200, resp.text[:500]
        (prediction,) = resp.json()["results"]
        assert prediction["model_version"] == "1.0.0" and prediction["result"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
