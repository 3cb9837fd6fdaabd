"""Generation with images: greedy decoding with the KV cache equals transformers' generate(do_sample=False) on tiny
random Gemma 3 and Qwen2.5-VL models whose ids come from real (offline) processors; the CLI's --image, and its bad
input (missing and non-image files, text-only models, checkpoints without a processor)."""
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from automodel_jax import AutoModelForImageTextToText
from automodel_jax.auto import load_vlm_for_inference
from automodel_jax.cli.generate import main
from automodel_jax.data.vlm import load_processor
from automodel_jax.generation.vlm import chat_inputs, generate_with_images
from automodel_jax.recipes.vlm.embedded import build_processor

NEW_TOKENS = 6


def tiny_vlm(model_type: str, directory, seed: int = 0, tie: bool = True):
    """(torch HF model in eval mode, build_processor's ids): a real tiny processor and a random model of matching ids
    saved together in `directory`; norms and biases (HF constants) get noise so that loading them wrongly shows."""
    info = build_processor(model_type, directory)
    torch.manual_seed(seed)
    if model_type == "gemma3":
        text = dict(vocab_size=info["vocab_size"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                    query_pre_attn_scalar=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                    initializer_range=0.2, bos_token_id=info["bos_token_id"], eos_token_id=info["eos_token_id"],
                    pad_token_id=info["pad_token_id"])
        vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      image_size=info["image_size"], patch_size=8, vision_use_head=False)
        config = transformers.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=info["mm_tokens_per_image"],
            image_token_index=info["image_token_index"], boi_token_index=info["boi_token_index"],
            eoi_token_index=info["eoi_token_index"], tie_word_embeddings=tie)
        hf = transformers.Gemma3ForConditionalGeneration(config)
    else:
        text = dict(vocab_size=info["vocab_size"], hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                    bos_token_id=None, eos_token_id=info["eos_token_id"], pad_token_id=info["pad_token_id"],
                    tie_word_embeddings=tie,
                    rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=100.0))
        vision = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, patch_size=info["patch_size"],
                      temporal_patch_size=info["temporal_patch_size"], spatial_merge_size=info["spatial_merge_size"],
                      window_size=56, out_hidden_size=64, fullatt_block_indexes=[1], initializer_range=0.2)
        config = transformers.Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, image_token_id=info["image_token_id"],
            video_token_id=info["video_token_id"], vision_start_token_id=info["vision_start_token_id"],
            vision_end_token_id=info["vision_end_token_id"], tie_word_embeddings=tie)
        hf = transformers.Qwen2_5_VLForConditionalGeneration(config)
    hf.eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias") or "mm_input_projection" in name:
                param.add_(0.2 * torch.randn_like(param))
    hf.save_pretrained(directory)
    return hf, info


def images(seed: int = 0, sizes=((64, 48), (40, 72))) -> list[Image.Image]:
    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 256, (h, w, 3), np.uint8)) for w, h in sizes]


def torch_inputs(inputs: dict) -> dict:
    return {k: torch.tensor(v) for k, v in inputs.items()}


def _checkpoint(model_type, tmp_path_factory):
    directory = tmp_path_factory.mktemp(model_type)
    hf, info = tiny_vlm(model_type, directory)
    return model_type, directory, hf, info


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """("gemma3", checkpoint dir with processor, torch HF model, build_processor's ids)."""
    return _checkpoint("gemma3", tmp_path_factory)


@pytest.fixture(scope="module", params=["gemma3", "qwen2_5_vl"])
def vlm(request, tmp_path_factory):
    """(model_type, checkpoint dir with processor, torch HF model, build_processor's ids)."""
    return request.getfixturevalue("gemma") if request.param == "gemma3" else _checkpoint(request.param,
                                                                                          tmp_path_factory)


def _hf_generate(hf, inputs: dict, eos) -> list[int]:
    with torch.no_grad():
        out = hf.generate(**torch_inputs(inputs), do_sample=False, max_new_tokens=NEW_TOKENS, eos_token_id=eos,
                          pad_token_id=0)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def test_greedy_generation_with_images_matches_hf_generate(vlm):
    """Two chats of different lengths and image counts in one call, padded on the right as a processor pads them:
    each row's tokens are those HF's generate(do_sample=False) gives for that chat alone."""
    model_type, directory, hf, info = vlm
    model, processor = load_vlm_for_inference(directory)
    one = chat_inputs(processor, "Colour?", images(1)[:1])
    two = chat_inputs(processor, "Which one of the two is larger, and why?", images(2))
    assert ("token_type_ids" if model_type == "gemma3" else "image_grid_thw") in one
    width = max(one["input_ids"].shape[1], two["input_ids"].shape[1])
    batch = {}
    for key in one:
        if one[key].shape == one["input_ids"].shape:  # per token: ids, mask, (mm_)token_type_ids
            rows = [np.pad(x[key], ((0, 0), (0, width - x[key].shape[1]))) for x in (one, two)]
            batch[key] = np.concatenate(rows)
        else:
            batch[key] = np.concatenate([one[key], two[key]])
    eos = info["eos_token_id"]
    ours = generate_with_images(model, processor.tokenizer, batch, max_new_tokens=NEW_TOKENS, eos_token_id=eos)
    assert ours == [_hf_generate(hf, one, eos), _hf_generate(hf, two, eos)]
    assert all(len(row) == NEW_TOKENS for row in ours)  # no early EOS: every step was compared


def test_cli_generates_with_images_as_hf(gemma, tmp_path, capsys):
    model_type, directory, hf, info = gemma
    paths = []
    for i, image in enumerate(images(3)):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        image.save(tmp_path / f"{i}.png")
    prompt = "Describe both images."
    assert main(["--model", str(directory), *paths, "--prompt", prompt, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    processor = load_processor(directory)
    loaded = [Image.open(tmp_path / f"{i}.png").convert("RGB") for i in range(2)]
    tokens = _hf_generate(hf, chat_inputs(processor, prompt, loaded), info["eos_token_id"])
    expected = processor.tokenizer.decode(tokens, skip_special_tokens=True)
    out = capsys.readouterr().out
    head = f"[user] {prompt}\n[assistant] "
    assert out.startswith(head) and out.endswith("\n")
    printed = out[len(head):-1]
    # The stream holds back a trailing incomplete UTF-8 sequence; everything before it is printed.
    assert printed == expected or (expected.endswith("\ufffd") and expected.startswith(printed))


@pytest.mark.parametrize("kind", ["missing", "not an image"])
def test_cli_bad_image_is_one_error_line_naming_the_file(gemma, tmp_path, capsys, kind):
    gemma_dir, path = gemma[1], tmp_path / "picture.png"
    if kind == "not an image":
        path.write_text("this is text, not a PNG\n")
    assert main(["--model", str(gemma_dir), "--image", str(path), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(path) in err


def test_cli_image_with_a_text_model_names_the_vlm_types(hf_model_factory, tmp_path, capsys):
    _, directory = hf_model_factory("LlamaForCausalLM", "LlamaConfig")
    images()[0].save(tmp_path / "a.png")
    capsys.readouterr()
    assert main(["--model", str(directory), "--image", str(tmp_path / "a.png"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'llama' is not a vision-language model" in err and "gemma3, qwen2_5_vl" in err
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        AutoModelForImageTextToText.from_pretrained(directory)


def test_checkpoint_without_processor_is_one_error_line(gemma, tmp_path, capsys):
    gemma_dir, bare = gemma[1], tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(gemma_dir / name, bare / name)
    images()[0].save(tmp_path / "a.png")
    assert main(["--model", str(bare), "--image", str(tmp_path / "a.png"), "--prompt", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bare) in err and "processor_config.json" in err
