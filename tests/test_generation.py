"""Generation with the KV cache: token-for-token parity with HF torch `generate` (tiny random Llama, stories260K,
a PEFT LoRA adapter), the cached decode against an uncached argmax loop, sampling filters against HF's warpers,
seeding, EOS handling, and the errors of bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from automodel_jax import AutoModelForCausalLM
from automodel_jax.checkpoint.peft_io import load_peft_adapter
from automodel_jax.auto import find_checkpoint_dir
from automodel_jax.generation import Sampling, bucket_length, filter_logits, generate
from reference import STORIES

PROMPTS = [[1, 17, 33, 52, 8], [1, 90, 4, 61, 77, 23, 9, 45, 3], [1, 64, 12]]
NEW = 12
PAD = 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF torch model, its checkpoint dir, our model loaded from it) for a tiny random Llama."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny")
    hf.save_pretrained(path)
    return hf, path, AutoModelForCausalLM.from_pretrained(path)


def _left_padded(prompts, width=None):
    width = width or max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _hf_generate(hf, prompts, eos, max_new_tokens=NEW) -> list[list[int]]:
    """HF greedy generate on left-padded prompts, each row cut after its first EOS (HF pads after it)."""
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=PAD, eos_token_id=eos)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def test_greedy_matches_hf_generate_on_left_padded_batch(tiny):
    hf, _, model = tiny
    ours = generate(model, None, PROMPTS, max_new_tokens=NEW, eos_token_id=2, pad_token_id=PAD)
    assert ours == _hf_generate(hf, PROMPTS, eos=2)


def test_cached_decode_equals_uncached_argmax_loop(tiny):
    _, _, model = tiny
    ours = generate(model, None, PROMPTS, max_new_tokens=NEW, eos_token_id=())
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda ids, mask, positions: nnx.merge(graphdef, state)(ids, mask, positions=positions))
    sequences = [list(p) for p in PROMPTS]
    for _ in range(NEW):  # the whole sequence every step, left padded to one width (one compile)
        ids, mask = (x.numpy() for x in _left_padded(sequences, width=max(map(len, PROMPTS)) + NEW))
        logits = forward(ids, mask, np.maximum(np.cumsum(mask, axis=1) - 1, 0))
        for seq, token in zip(sequences, np.asarray(jnp.argmax(logits[:, -1], axis=-1))):
            seq.append(int(token))
    assert ours == [s[len(p):] for s, p in zip(sequences, PROMPTS)]
    assert all(len(row) == NEW for row in ours)


@pytest.mark.assets
def test_greedy_matches_hf_generate_on_stories260k():
    tokenizer = transformers.AutoTokenizer.from_pretrained(STORIES)
    hf = transformers.AutoModelForCausalLM.from_pretrained(STORIES).eval()
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    texts = ["Once upon a time", "Lily and Tom went to the park. They saw", "The cat"]
    ours = generate(model, tokenizer, texts, max_new_tokens=40)
    assert ours == _hf_generate(hf, [tokenizer(t)["input_ids"] for t in texts], eos=2, max_new_tokens=40)
    assert max(map(len, ours)) > 20 and "\ufffd" not in tokenizer.decode(ours[0])


def test_eos_stops_only_its_row_and_stream_sees_every_token(tiny):
    _, _, model = tiny
    free = generate(model, None, PROMPTS, max_new_tokens=NEW, eos_token_id=())
    eos = free[0][3]
    streamed = {row: [] for row in range(len(PROMPTS))}
    stopped = generate(model, None, PROMPTS, max_new_tokens=NEW, eos_token_id=eos,
                       stream=lambda row, token: streamed[row].append(token))
    expected = [row[:row.index(eos) + 1] if eos in row else row for row in free]
    assert stopped == expected and len(stopped[0]) <= 4
    assert [streamed[row] for row in range(len(PROMPTS))] == stopped


def test_sampling_is_seeded_and_top_k_one_is_greedy(tiny):
    _, _, model = tiny
    sample = dict(max_new_tokens=NEW, eos_token_id=(), temperature=1.0)
    first = generate(model, None, PROMPTS, seed=3, **sample)
    assert generate(model, None, PROMPTS, seed=3, **sample) == first
    assert generate(model, None, PROMPTS, seed=4, **sample) != first
    greedy = generate(model, None, PROMPTS, max_new_tokens=NEW, eos_token_id=())
    assert generate(model, None, PROMPTS, seed=5, top_k=1, **sample) == greedy
    assert first != greedy


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 0.9), (1.3, 5, 1.0), (1.0, 10, 0.5), (0.5, 0, 0.3)])
def test_filters_match_hf_logits_warpers(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 50).astype(np.float32) * 3
    warpers = [transformers.TemperatureLogitsWarper(temperature)]
    warpers += [transformers.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [transformers.TopPLogitsWarper(top_p)] if top_p < 1 else []
    expected = torch.tensor(logits)
    for warper in warpers:
        expected = warper(None, expected)
    ours = np.asarray(filter_logits(jnp.asarray(logits), Sampling(temperature, top_k, top_p)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected.numpy()))
    np.testing.assert_allclose(ours[~np.isinf(ours)], expected.numpy()[~np.isinf(ours)], rtol=1e-6)


def test_sampled_frequencies_follow_the_nucleus():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = jax.vmap(lambda k: jax.random.categorical(k, filter_logits(logits, Sampling(1.0, 0, 0.7))[0]))(keys)
    counts = np.bincount(np.asarray(draws), minlength=4) / len(keys)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] - 0.5 / 0.8) < 0.03


def test_peft_adapter_generation_matches_peft_torch(tiny, tmp_path):
    hf, path, _ = tiny
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                           init_lora_weights=False)
    adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path).eval(), lora).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    model = AutoModelForCausalLM.from_pretrained(path)
    load_peft_adapter(model, tmp_path / "adapter")
    assert model.model.layers[1].mlp.down_proj.lora_scale == 2.0
    expected = _hf_generate(adapted, PROMPTS, eos=2)
    assert expected != _hf_generate(hf, PROMPTS, eos=2)  # the adapter changes the output, so parity means loaded
    assert generate(model, None, PROMPTS, max_new_tokens=NEW, eos_token_id=2, pad_token_id=PAD) == expected


@pytest.mark.parametrize("prompts, kwargs, message", [
    ([], {}, "non-empty list"),
    (["hello"], {}, "prompt 0 is text but no tokenizer"),
    ([[1, 2], []], {}, "prompt 1 has no tokens"),
    ([[1, 500]], {}, r"prompt 0 has token id 500, outside the model's embedding table \(vocab_size 101"),
    ([[1, 2]], dict(pad_token_id=101), r"the padding token has token id 101, outside the model's embedding table"),
    ([[1, 2]], dict(max_new_tokens=200), r"a prompt of 2 positions \+ max_new_tokens 200 needs 202 positions, more "
                                         r"than the model's context of 128 .*; set max_new_tokens to at most 126"),
    ([[1, 2]], dict(max_new_tokens=0), "max_new_tokens 0 must be >= 1"),
    ([[1, 2]], dict(temperature=-1.0), "temperature -1.0 must be >= 0"),
    ([[1, 2]], dict(top_k=-2), "top_k -2 must be >= 0"),
    ([[1, 2]], dict(top_p=0.0), r"top_p 0.0 must be in \(0, 1\]"),
])
def test_bad_generate_arguments_are_clear_errors(tiny, prompts, kwargs, message):
    _, _, model = tiny
    with pytest.raises(ValueError, match=message):
        generate(model, None, prompts, **{"max_new_tokens": 2, **kwargs})


@pytest.mark.assets
def test_run_directories_resolve_to_their_newest_checkpoint(tmp_path):
    export = tmp_path / "run" / "export" / "final"
    export.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (export / name).symlink_to(STORIES / name)
    (tmp_path / "run" / "config.json").write_text('{"run_dir": "x"}')  # the recipe's own config, not a model
    assert find_checkpoint_dir(tmp_path / "run") == export
    assert find_checkpoint_dir(STORIES) == STORIES
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is neither an HF checkpoint directory"):
        find_checkpoint_dir(tmp_path / "empty")


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 16, 17, 33, 64, 65, 130)] == [16, 16, 32, 64, 64, 128, 192]


def test_only_dynamic_rope_scaling_generates_past_the_context(caplog):
    """Positions past max_position_embeddings are refused, unless the model's rope scaling is "dynamic" (NTK), which
    HF defines for any length: then generation goes on and says so."""
    hf_config = dict(model_type="llama", vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8)
    with pytest.raises(ValueError, match="a prompt of 3 positions \\+ max_new_tokens 7 needs 10 positions, more than "
                                         "the model's context of 8 .*; set max_new_tokens to at most 5"):
        generate(AutoModelForCausalLM.from_config(hf_config), None, [[1, 2, 3]], max_new_tokens=7)
    dynamic = AutoModelForCausalLM.from_config({**hf_config, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with caplog.at_level("INFO", logger="automodel_jax.generation"):
        [new] = generate(dynamic, None, [[1, 2, 3]], max_new_tokens=7, eos_token_id=())
    assert len(new) == 7
    assert "dynamic rope scaling (factor 2) stretches its rotary embedding to that length" in caplog.text
