"""The real-parts VLM (``asset:clip-smollm2-llava``): the LLaVA composite builder and ``vtquant eval vlm``.

Fast tests build the composite from tiny random parts (a transformers CLIP vision tower and a Llama
with the tests' character tokenizer); the ``slow`` test builds the real one (CLIP ViT-B/16 + SmolLM2,
from the cached assets) and runs the evaluation end to end.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from chartok import char_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
SENTENCES = ("The cat sat on the warm mat by the door. A small red boat drifted slowly down the river. "
             "She wrote a long letter to her sister in the country. The old clock struck nine in the quiet hall. "
             "Rain fell all night over the grey roofs of the town. He carried the heavy basket up the hill. ") * 3


def tiny_parts(image_size: int = 32, patch: int = 8):
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

    from vtquant.adapters.hf_decoder import tiny_config

    torch.manual_seed(0)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=image_size, patch_size=patch, hidden_act="quick_gelu")
    vision = CLIPVisionModel(vcfg).eval()
    tok = char_tokenizer()
    tok.chat_template = TEMPLATE
    lm = LlamaForCausalLM(tiny_config(vocab_size=len(tok), max_position_embeddings=512)).eval()
    return vision, lm, tok


def photos(n: int, size: int = 40) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [(f"img{i}", Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8))) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_llava():
    from vtquant.vlm_parts import build_llava

    vision, lm, tok = tiny_parts()
    model, processor, info = build_llava(vision, lm, tok, seed=3, scale_images=[im for _, im in photos(3)])
    return model, processor, info, vision, lm, tok


def test_composite_structure_and_parts(tiny_llava):
    """The composite holds the parts' weights, an <image> token, 16 patch tokens per 32 px image, and the
    projector is seeded (same seed, same weights) and scaled to the LM's embedding norm."""
    from transformers import LlavaForConditionalGeneration

    from vtquant.vlm_parts import build_llava

    model, processor, info, vision, lm, tok = tiny_llava
    assert isinstance(model, LlavaForConditionalGeneration)
    assert info["trained"] is False and info["image_tokens"] == 16
    assert info["image_token_id"] == len(tok) and "<image>" not in tok.get_vocab()  # the caller's tokenizer untouched
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    lm_emb = model.model.language_model.embed_tokens.weight
    assert torch.equal(lm_emb[:len(tok)], lm.model.embed_tokens.weight)
    assert lm_emb.shape[0] == len(tok) + 1
    assert model.lm_head.weight is lm_emb  # tied, as SmolLM2
    vt = model.model.vision_tower
    assert torch.equal(vt.encoder.layers[1].mlp.fc2.weight,
                       dict(vision.named_parameters())[[k for k, _ in vision.named_parameters()
                                                        if k.endswith("layers.1.mlp.fc2.weight")][0]])
    # the same hidden state at layer -2 as the part itself (patch tokens, CLS dropped)
    pix = processor.image_processor(images=[photos(1)[0][1]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        own = vision(pixel_values=pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = model.model.get_image_features(pixel_values=pix).pooler_output
    feats = torch.stack(list(feats)) if isinstance(feats, (list, tuple)) else feats
    proj = model.model.multi_modal_projector
    assert torch.allclose(feats, proj(own), atol=1e-5)
    # scaled: the median projected token norm of the scale images equals the mean text-embedding norm
    pix3 = processor.image_processor(images=[im for _, im in photos(3)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f3 = model.model.get_image_features(pixel_values=pix3).pooler_output
    f3 = torch.cat(list(f3)) if isinstance(f3, (list, tuple)) else f3.flatten(0, -2)
    assert float(f3.norm(dim=-1).median()) == pytest.approx(info["text_embedding_norm"], rel=1e-4)
    # seeded: the same seed gives the same projector (before scaling), another seed another one
    again, _, info2 = build_llava(vision, lm, tok, seed=3)
    other, _, _ = build_llava(vision, lm, tok, seed=4)
    w = again.model.multi_modal_projector.linear_2.weight
    assert torch.allclose(w * info["projector_scale"], proj.linear_2.weight)
    assert not torch.allclose(w, other.model.multi_modal_projector.linear_2.weight)


def test_processor_prompts_and_generate(tiny_llava, tmp_path):
    """Image + text pairs through the processor and chat template: one <image> expands to 16 tokens; FP
    scored against itself agrees exactly; greedy generation with the KV cache equals the uncached one."""
    from vtquant.eval.vlm import reference_outputs, score, vlm_pairs

    model, processor, info, *_ = tiny_llava
    text = tmp_path / "t.txt"
    text.write_text(SENTENCES)
    pairs = vlm_pairs(processor, photos(2), str(text), seed=1)
    ids = pairs[0].batch["input_ids"][0]
    assert int((ids == info["image_token_id"]).sum()) == 16
    assert pairs[0].answer in SENTENCES and pairs[0].prompt_batch["input_ids"].shape[1] < ids.shape[0]
    ref = reference_outputs(model, pairs, new_tokens=5)
    assert all(len(g) == 5 for g in ref.generations)
    with torch.no_grad():
        slow = model.generate(**pairs[0].prompt_batch, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                              use_cache=False)
    assert slow[0, pairs[0].prompt_batch["input_ids"].shape[1]:].tolist() == ref.generations[0]
    s = score(model, pairs, ref, new_tokens=5)
    assert s["next_token_agreement"] == 1.0 and s["logit_rel_error"] == 0.0 and s["greedy_exact"] == 1.0
    # a changed model is seen: the last LM layer's down projection zeroed
    import copy

    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.model.language_model.layers[-1].mlp.down_proj.weight.mul_(-3.0)
    s2 = score(broken, pairs, ref, new_tokens=5)
    assert s2["logit_rel_error"] > 0.01


def test_bad_model_spec():
    from vtquant.errors import DataError
    from vtquant.vlm_parts import load_vlm

    with pytest.raises(DataError, match="not a vision-language asset"):
        load_vlm("asset:smollm2-135m")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_vlm("vlm:/nonexistent/folder")


@pytest.mark.slow
def test_real_composite_eval_cli(tmp_path):
    """The real composite (CLIP ViT-B/16 + SmolLM2, cached assets): ``vtquant eval vlm`` runs FP and
    insertquant W8A8 on 2 calibration / 2 held-out photos and writes rows with per-tower sinks."""
    from vtquant.cli import main

    out = tmp_path / "vlm.json"
    rc = main(["eval", "vlm", "--model", "asset:clip-smollm2-llava", "--recipe", "recipes/hf/clip-smollm2-llava.yaml",
               "--methods", "fp,insertquant", "--calib-images", "2", "--eval-images", "2", "--new-tokens", "4",
               "--quiet", "--results-file", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    rows = {(r["method"], r["metric"]): r for r in data["rows"]}
    assert rows[("fp", "next_token_agreement")]["value"] == 1.0
    q = rows[("insertquant", "next_token_agreement")]
    assert 0.3 < q["value"] <= 1.0
    assert q["eval_sinks"]["vision_patches"]["max"] >= 1  # CLIP's artifact patches
    assert q["eval_sinks"]["lm_first_token"]["mean"] == 1.0  # SmolLM2's first-token sink
    assert data["model_info"]["trained"] is False


def test_lm_eval_multimodal_wrapper(tiny_llava):
    """lm-eval's hf-multimodal class around the in-memory composite: an image + text generate_until request
    gives the same text as the model's own greedy generate on the processor's inputs."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from vtquant.eval.vlm import chat_text, lm_eval_vlm

    model, processor, *_ = tiny_llava
    lm = lm_eval_vlm(model, processor, batch_size=1, max_length=256)
    img = photos(1)[0][1]
    context = chat_text(processor, "Describe this image.", None)
    req = Instance(request_type="generate_until", doc={}, idx=0,
                   arguments=(context, {"until": ["\n\n\n"], "max_gen_toks": 6, "do_sample": False}, {"visual": [img]}))
    out = lm.generate_until([req], disable_tqdm=True)
    inputs = processor(images=[img], text=[context], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=True)
    expected = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:])
    assert out == [expected.split("\n\n\n")[0]]


def _pairs_from(batches: list) -> list:
    from vtquant.eval.vlm import VLMPair

    out = []
    for i, b in enumerate(batches):
        for r in range(b["input_ids"].shape[0]):
            one = {k: b[k][r:r + 1] for k in ("input_ids", "attention_mask", "pixel_values")}
            cut = one["input_ids"].shape[1] - 3  # the prompt: up to the image and two words after it
            prompt = {"input_ids": one["input_ids"][:, :cut], "attention_mask": one["attention_mask"][:, :cut],
                      "pixel_values": one["pixel_values"]}
            out.append(VLMPair(f"b{i}r{r}", "", "", one, prompt))
    return out


def test_evaluate_vlm_counts_implanted_sinks_per_tower():
    """evaluate_vlm with vtquant.quantize_vlm_ on the tiny LLaVA with implanted sinks (tests/vlmmodels.py):
    the per-tower sink counts of the held-out pairs are the implanted ones (vision: the painted patches
    per image, CLS apart; language: the first token and the image tokens of painted patches), FP scores
    itself exactly, and insertquant W8A8 stays closer to FP than naive-static W8A8."""
    import visionmodels as vm
    import vlmmodels as vl

    from vtquant.config import Recipe, SinkConfig
    from vtquant.eval.vlm import VLMData, evaluate_vlm, vlm_method_recipe

    model = vl.tiny_llava()
    calib = _pairs_from([vl.llava_batch(vm.random_painted(4, s), seed=s) for s in range(2)])
    painted = vm.random_painted(4, 60, max_per_image=3)
    held = _pairs_from([vl.llava_batch(painted, seed=60)])
    base = Recipe(sinks=SinkConfig(known_sinks=["cls", "first_token"]), ignore=[])
    settings = [None] + [vlm_method_recipe(m, base) for m in ("naive-static", "insertquant")]
    res = evaluate_vlm(model, None, settings, "tiny-llava", data=VLMData(calib, held, "c", "e"), new_tokens=3,
                       quiet=True, log=lambda s: None)
    by = {d["method"]: d for d in res.details}
    assert by["fp"]["next_token_agreement"] == 1.0 and by["fp"]["greedy_exact"] == 1.0
    sinks = by["insertquant"]["sinks"]
    n = [len(p) for p in painted]
    assert sinks["vision_patches"]["n"] == 4 and sinks["vision_patches"]["mean"] == pytest.approx(sum(n) / 4)
    assert (sinks["vision_patches"]["min"], sinks["vision_patches"]["max"]) == (min(n), max(n))
    assert sinks["vision_prefix"]["mean"] == 1.0
    assert sinks["lm_first_token"]["mean"] == 1.0 and sinks["lm_text_tokens"]["max"] == 0
    assert sinks["lm_image_tokens"]["mean"] == pytest.approx(sum(n) / 4)
    assert by["insertquant"]["logit_rel_error"] < by["naive-static"]["logit_rel_error"]
    assert by["insertquant"]["next_token_agreement"] >= by["naive-static"]["next_token_agreement"]
    rows = [r for r in res.rows if r.method == "insertquant"]
    assert {r.metric for r in rows} == {"next_token_agreement", "logit_rel_error", "greedy_agreement", "greedy_exact"}
    assert rows[0].extra["tower_methods"]["vision"] == "insertquant"


def test_cli_vlm_bad_inputs(capsys):
    """One-line errors before any model load: --out for a VLM (saving is not supported), a non-VLM model for
    eval vlm, --methods recipe without --recipe."""
    from vtquant.cli import main

    rc = main(["quantize", "--model", "asset:clip-smollm2-llava", "--recipe", "recipes/hf/clip-smollm2-llava.yaml",
               "--out", "somewhere"])
    assert rc == 2 and "saving a quantized vision-language model is not supported" in capsys.readouterr().err
    rc = main(["eval", "vlm", "--model", "timm:vit_small_patch16_224"])
    assert rc == 2 and "needs asset:clip-smollm2-llava" in capsys.readouterr().err
    rc = main(["eval", "vlm", "--methods", "fp,recipe"])
    assert rc == 2 and "--recipe" in capsys.readouterr().err
    rc = main(["quantize", "--recipe", "recipes/hf/smollm2-135m.yaml"])
    assert rc == 2 and "--out" in capsys.readouterr().err
