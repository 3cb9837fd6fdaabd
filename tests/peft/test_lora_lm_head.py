"""LoRA on an untied lm_head against HF PEFT (tiny random Llama, float32): the logits, the loss and the adapter
gradients of every loss implementation, KV-cache generation, training, PEFT export and import, and merging; naming an
output head tied to the embeddings, or an embedding, is a clear error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from automodel_jax import AutoModelForCausalLM
from automodel_jax.checkpoint.peft_io import load_peft_adapter, save_peft_adapter
from automodel_jax.checkpoint.safetensors_io import CheckpointError
from automodel_jax.generation import generate
from automodel_jax.losses.cross_entropy import IMPLS
from automodel_jax.models.layers import LoRAParam
from automodel_jax.models.params import flatten
from automodel_jax.parallel.sharding import make_mesh, tree_shardings
from automodel_jax.peft.lora import apply_lora, linear_modules, merge_lora, split_model
from automodel_jax.training.optim import build_optimizer, optim_defaults
from automodel_jax.training.step import init_state, make_train_step, token_loss

VOCAB, SEQ = 101, 9
TARGETS = ["q_proj", "v_proj", "lm_head"]


@pytest.fixture(autouse=True)
def exact_matmuls():
    """float32 matmuls at full precision (GPUs default to TF32, which misses the 1e-5 tolerances against PEFT)."""
    with jax.default_matmul_precision("highest"):
        yield


def _randomize_adapters(model) -> None:
    """Nonzero lora_b everywhere (fresh adapters have B = 0, under which an ignored adapter would pass unnoticed)."""
    for i, layer in enumerate(l for l in linear_modules(model).values() if l.lora_a is not None):
        b = layer.lora_b[...]
        layer.lora_b = LoRAParam(0.3 * jax.random.normal(jax.random.key(100 + i), b.shape, b.dtype))


@pytest.fixture
def adapted(hf_llama_factory, tmp_path):
    """(our model with LoRA on q_proj, v_proj and lm_head, the same adapter exported and loaded by peft.PeftModel
    (trainable), base checkpoint dir)."""
    import peft
    hf, path = hf_llama_factory(vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert "lm_head" in apply_lora(model, r=4, alpha=8.0, target_modules=TARGETS, seed=1)
    _randomize_adapters(model)
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=str(path))
    ref = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter", is_trainable=True)
    assert "lm_head" in ref.peft_config["default"].target_modules
    return model, ref, path


def _batch():
    """Right-padded rows with prompt tokens and padding ignored in the labels."""
    rng = np.random.RandomState(0)
    ids = rng.randint(0, VOCAB, (2, SEQ)).astype(np.int32)
    labels = rng.randint(0, VOCAB, (2, SEQ)).astype(np.int32)
    segment_ids = np.ones_like(ids)
    segment_ids[1, 6:] = 0
    labels[:, :2] = -100
    labels[segment_ids == 0] = -100
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape).copy()
    return dict(input_ids=ids, labels=labels, segment_ids=segment_ids, positions=positions)


def _torch_logits(ref, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        return ref(torch.tensor(ids, dtype=torch.long),
                   attention_mask=None if mask is None else torch.tensor(mask)).logits.numpy()


def test_lm_head_adapter_changes_logits_as_peft(adapted):
    model, ref, _ = adapted
    ids = _batch()["input_ids"]
    want = _torch_logits(ref, ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, atol=1e-5)
    with ref.disable_adapter():
        base = _torch_logits(ref, ids)
    assert np.abs(want - base).max() > 0.1


@pytest.mark.parametrize("impl", IMPLS)
def test_loss_and_adapter_gradients_equal_peft(adapted, impl):
    model, ref, _ = adapted
    batch = _batch()
    graphdef, trainable, frozen = split_model(model, lora=True)
    (loss_sum, count), grads = jax.value_and_grad(
        lambda p: token_loss(graphdef, p, frozen, {k: jnp.asarray(v) for k, v in batch.items()}, loss_impl=impl,
                             max_segments=1, chunk_size=8),
        has_aux=True)(trainable)
    ref.train()  # dropout is 0: train mode only makes autograd record
    logits = ref(torch.tensor(batch["input_ids"], dtype=torch.long),
                 attention_mask=torch.tensor(batch["segment_ids"])).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), torch.tensor(batch["labels"].reshape(-1),
                                             dtype=torch.long), ignore_index=-100, reduction="sum")
    want.backward()
    assert int(count) == int((batch["labels"] != -100).sum())
    np.testing.assert_allclose(float(loss_sum), float(want), rtol=1e-5)
    ours = {".".join(map(str, k)): np.asarray(v) for k, v in flatten(grads).items()}
    theirs = {n.removeprefix("base_model.model.").replace(".default", "").replace("lora_A.weight", "lora_a")
              .replace("lora_B.weight", "lora_b"): p.grad.numpy().T for n, p in ref.named_parameters() if p.requires_grad}
    assert sorted(ours) == sorted(theirs) and "lm_head.lora_b" in ours
    for name in theirs:
        np.testing.assert_allclose(ours[name], theirs[name], atol=1e-5, rtol=1e-4, err_msg=name)
    assert np.abs(ours["lm_head.lora_b"]).max() > 1e-3


def test_kv_cache_generation_uses_the_adapter(adapted):
    model, ref, _ = adapted
    prompt = [5, 17, 42, 8]
    ours = generate(model, None, [prompt], max_new_tokens=6, eos_token_id=[], pad_token_id=0)[0]
    ids = list(prompt)
    for _ in range(6):  # PEFT's greedy continuation, one full forward per token
        ids.append(int(_torch_logits(ref, np.asarray([ids]))[0, -1].argmax()))
    assert ours == ids[len(prompt):]


def test_training_moves_lm_head_adapter(hf_llama_factory):
    _, path = hf_llama_factory(vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_pretrained(path)
    apply_lora(model, r=4, alpha=8.0, target_modules=TARGETS)
    cfg = optim_defaults()
    cfg.update(name="adamw", learning_rate=1e-2)
    optimizer, schedule = build_optimizer(cfg, 3)
    graphdef, trainable, frozen = split_model(model, lora=True)
    state, _ = init_state(trainable, optimizer, 0, tree_shardings(model, trainable, make_mesh()))
    step = jax.jit(make_train_step(graphdef, optimizer, schedule, loss_impl="chunked", max_segments=1))
    batch = {k: jnp.asarray(v)[None] for k, v in _batch().items()}
    assert not state["params"]["lm_head"]["lora_b"].any()
    for _ in range(3):
        state, metrics = step(state, frozen, batch)
        assert bool(metrics["finite"])
    assert float(jnp.abs(state["params"]["lm_head"]["lora_b"]).min()) > 0


def test_peft_made_lm_head_adapter_loads(hf_llama_factory, tmp_path):
    import peft
    hf, path = hf_llama_factory(vocab_size=VOCAB)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["lm_head"],
                                                  init_lora_weights=False)).eval()
    ref.save_pretrained(tmp_path / "peft")
    model = AutoModelForCausalLM.from_pretrained(path)
    base = np.asarray(model(jnp.asarray(_batch()["input_ids"])))
    assert load_peft_adapter(model, tmp_path / "peft") == ["lm_head"]
    ids = _batch()["input_ids"]
    want = _torch_logits(ref, ids)
    got = np.asarray(model(jnp.asarray(ids)))
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.abs(got - base).max() > 0.1


def test_saved_lm_head_weight_replaces_the_base_as_in_peft(hf_llama_factory, tmp_path, caplog):
    """PEFT saves an adapted lm_head's own weight (`base_layer.weight`) with the adapter and loads it over the base's;
    so do we, with a warning naming it when it differs."""
    import peft
    import safetensors.torch
    import transformers
    hf, path = hf_llama_factory(vocab_size=VOCAB)
    peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["lm_head"],
                                            init_lora_weights=False)).save_pretrained(tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(weights)
    tensors["base_model.model.lm_head.base_layer.weight"] += 0.5
    safetensors.torch.save_file(tensors, weights)
    ref = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(path), tmp_path / "peft")
    model = AutoModelForCausalLM.from_pretrained(path)
    with caplog.at_level("WARNING"):
        load_peft_adapter(model, tmp_path / "peft")
    assert "lm_head.base_layer.weight differs from the base model's lm_head weight" in caplog.text
    ids = _batch()["input_ids"]
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _torch_logits(ref.eval(), ids), atol=1e-5)


def test_merge_folds_lm_head_adapter_like_peft(adapted):
    model, ref, _ = adapted
    ids = _batch()["input_ids"]
    merge_lora(model)
    assert model.lm_head.lora_a is None
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), _torch_logits(ref.merge_and_unload(), ids),
                               atol=1e-5)


def test_tied_head_and_embeddings_are_clear_errors(hf_llama_factory, tmp_path):
    import peft
    hf, path = hf_llama_factory(vocab_size=VOCAB, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match=r"'lm_head' names lm_head, .*ties its output head to model\.embed_tokens "
                                         r"\(tie_word_embeddings=true\)"):
        apply_lora(model, r=4, alpha=8.0, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match=r"'embed_tokens' names model\.embed_tokens, .*LoRA on embeddings"):
        apply_lora(model, r=4, alpha=8.0, target_modules=["q_proj", "embed_tokens"])
    assert apply_lora(model, r=4, alpha=8.0, target_modules=["re:.*"], exclude_modules=["embed_tokens", "lm_head"])
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=16, target_modules=["lm_head"],
                                                  init_lora_weights=False))
    ref.save_pretrained(tmp_path / "peft")
    with pytest.raises(CheckpointError, match=r"module lm_head has a LoRA adapter, .*tie_word_embeddings=true"):
        load_peft_adapter(AutoModelForCausalLM.from_pretrained(path), tmp_path / "peft")


def test_lm_head_adapter_dropout_applies_in_training_only(hf_llama_factory):
    """PEFT's lora_dropout on lm_head's adapter input: a training call (with a dropout key) differs, inference does
    not, and a fresh adapter (B = 0) is a no-op either way."""
    _, path = hf_llama_factory(vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = jnp.asarray(_batch()["input_ids"])
    base = np.asarray(model(ids))
    apply_lora(model, r=4, alpha=8.0, dropout=0.5, target_modules=["lm_head"])
    np.testing.assert_array_equal(np.asarray(model(ids, dropout_rng=jax.random.key(0))), base)
    _randomize_adapters(model)
    adapted = np.asarray(model(ids))
    assert np.abs(adapted - base).max() > 0.1
    np.testing.assert_array_equal(np.asarray(model(ids)), adapted)
    assert np.abs(np.asarray(model(ids, dropout_rng=jax.random.key(0))) - adapted).max() > 1e-3
