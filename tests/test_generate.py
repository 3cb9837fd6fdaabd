"""`python -m automodel_jax.generate` on stories260K: a real streamed run, --chat, --adapter, and its bad-input errors."""
import json
import re
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from automodel_jax.cli.generate import TerminalStream, main
from reference import REPO, STORIES

pytestmark = pytest.mark.assets
CHAT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(STORIES)


def _hf_continuation(hf, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    whole = tokenizer.decode(out[0], skip_special_tokens=True)
    return whole[len(tokenizer.decode(ids, skip_special_tokens=True)):]


@pytest.mark.slow
def test_cli_prints_the_greedy_continuation(tokenizer):
    prompt = "Once upon a time"
    run = subprocess.run([sys.executable, "-m", "automodel_jax.generate", "--model", str(STORIES), "--prompt", prompt,
                          "--max-new-tokens", "30"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    expected = _hf_continuation(hf, tokenizer, tokenizer(prompt)["input_ids"], 30)
    assert len(expected) > 40
    assert run.stdout == prompt + expected + "\n"


def test_stream_writes_whole_characters_as_they_complete(tokenizer):
    ids = tokenizer("The snowman ☃ smiled at the café.")["input_ids"]
    assert len(ids) > len(tokenizer.tokenize("The snowman smiled at the cafe.")) + 2  # ☃ and é are byte pieces
    writes = []
    out = type("Out", (), {"write": lambda self, text: writes.append(text), "flush": lambda self: None})()
    stream = TerminalStream(tokenizer, ids[:3], out)
    for token in ids[3:]:
        stream(0, token)
    assert "".join(writes) == tokenizer.decode(ids, skip_special_tokens=True)[len(tokenizer.decode(ids[:3],
                                                                                  skip_special_tokens=True)):]
    assert len(writes) > 5 and not any("\ufffd" in w for w in writes)


def test_chat_wraps_the_prompt_in_the_chat_template(tmp_path, tokenizer, capsys):
    for f in STORIES.iterdir():
        if f.is_file() and f.name != "tokenizer_config.json":
            (tmp_path / f.name).symlink_to(f)
    config = json.loads((STORIES / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    assert main(["--model", str(tmp_path), "--prompt", "Tell me a story", "--chat", "--max-new-tokens", "12"]) == 0
    rendered = "[user] Tell me a story\n[assistant]"
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    ids = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    expected = tokenizer.decode(hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                            pad_token_id=0)[0, len(ids):], skip_special_tokens=True)
    assert capsys.readouterr().out == f"[user] Tell me a story\n[assistant] {expected}\n"


def _stories_adapter(directory: Path, **config) -> Path:
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    adapted = peft.get_peft_model(base, peft.LoraConfig(**config)).eval()
    adapted.save_pretrained(directory)
    return adapted


def test_adapter_is_applied(tmp_path, tokenizer, capsys):
    adapted = _stories_adapter(tmp_path, r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"],
                               init_lora_weights=False)
    prompt = "The dog"
    assert main(["--model", str(STORIES), "--adapter", str(tmp_path), "--prompt", prompt,
                 "--max-new-tokens", "15"]) == 0
    expected = _hf_continuation(adapted, tokenizer, tokenizer(prompt)["input_ids"], 15)
    assert capsys.readouterr().out == prompt + expected + "\n"


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model", "--prompt", "hi"], "model path '/nonexistent/model' is not a checkpoint"),
    (["--model", str(STORIES), "--prompt", "hi", "--prompt", "  "], "--prompt number 2 is empty"),
    (["--model", str(STORIES), "--prompt", "hi", "--chat"], "has no chat template; drop --chat"),
    (["--model", str(STORIES), "--prompt", "hi", "--top-p", "1.5"], r"top_p 1.5 must be in \(0, 1\]"),
    (["--model", str(STORIES), "--prompt", "hi", "--max-new-tokens", "1000"],
     r"a prompt of (\d+) positions \+ max_new_tokens 1000 needs \d+ positions, more than the model's context of 512 "
     r"\(max_position_embeddings in its config.json\); set max_new_tokens to at most 5\d\d"),
])
def test_bad_input_is_one_clear_error(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert re.search(message, err)


def test_adapter_for_modules_the_model_lacks_is_a_clear_error(tmp_path, capsys):
    _stories_adapter(tmp_path, r=2, lora_alpha=4, target_modules=["q_proj"])
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k.replace("q_proj", "c_attn"): v for k, v in load_file(weights).items()}, weights)
    capsys.readouterr()  # drop the progress bars of building the adapter
    assert main(["--model", str(STORIES), "--adapter", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "module model.layers.0.self_attn.c_attn is not a Linear layer" in err and err.count("\n") == 1


def test_a_tokenizer_with_ids_past_the_embedding_table_is_refused(stories_added_pad, capsys):
    """An added pad token (id 512) on a model with 512 embeddings would pad even one prompt with NaN embeddings."""
    assert main(["--model", str(stories_added_pad), "--prompt", "Once upon a time"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert ("error: the tokenizer's pad token '<pad>' has token id 512, outside the model's embedding table "
            "(vocab_size 512, ids 0..511)") in captured.err


def test_non_finite_logits_are_an_error_naming_the_broken_parameter(tmp_path, capsys):
    for f in STORIES.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            (tmp_path / f.name).symlink_to(f.resolve())
    weights = load_file(STORIES / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert main(["--model", str(tmp_path), "--prompt", "Once upon a time", "--max-new-tokens", "4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "Once upon a time"  # the prompt, then nothing picked from NaN
    assert captured.err.count("\n") == 1
    assert ("error: the model's logits for prompt 0 are not finite (NaN or inf) at new token 0, so no token can be "
            "picked; the scale of module model.norm holds NaN or inf") in captured.err
