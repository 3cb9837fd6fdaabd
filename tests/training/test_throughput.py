"""Throughput metrics: the train step counts processed (non-padding) and label tokens of the global batch; FLOPs per
token follow PaLM's 6 N + 12 L H Q T with N from transformers' own parameter count (4 N for frozen weights under LoRA);
rates, MFU and the peak table."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from automodel_jax import AutoModelForCausalLM
from automodel_jax.parallel.sharding import make_mesh, tree_shardings
from automodel_jax.peft.lora import adapters, apply_lora, split_model
from automodel_jax.training.metrics import Throughput, peak_tflops, train_flops_per_token
from automodel_jax.training.optim import build_optimizer, optim_defaults
from automodel_jax.training.step import init_state, make_train_step

SEQ = 16


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_is_palm_formula_with_transformers_parameter_count(hf_llama_factory, tied):
    hf, path = hf_llama_factory(tie_word_embeddings=tied)
    c = hf.config
    # transformers leaves the embedding table out; the output head is a matmul, tied or not.
    matmul_params = hf.num_parameters(exclude_embeddings=True) + tied * c.vocab_size * c.hidden_size
    attention = 12 * c.num_hidden_layers * c.num_attention_heads * (c.hidden_size // c.num_attention_heads) * SEQ

    model = AutoModelForCausalLM.from_pretrained(path)
    _, trainable, frozen = split_model(model, False)
    assert train_flops_per_token(model, trainable, frozen, SEQ) == 6 * matmul_params + attention

    apply_lora(model, r=4, alpha=8.0, target_modules=("*_proj",))
    _, trainable, frozen = split_model(model, True)
    lora_params = sum(a.size + b.size for a, b in adapters(model).values())
    assert train_flops_per_token(model, trainable, frozen, SEQ) == 6 * lora_params + 4 * matmul_params + attention


def test_step_counts_processed_and_label_tokens_of_the_global_batch(hf_llama_factory):
    _, path = hf_llama_factory()
    model = AutoModelForCausalLM.from_pretrained(path)
    apply_lora(model, r=4, alpha=8.0, target_modules=("*_proj",))
    graphdef, trainable, frozen = split_model(model, True)
    optimizer, schedule = build_optimizer(optim_defaults(), 10)
    state, _ = init_state(trainable, optimizer, 0, tree_shardings(model, trainable, make_mesh()))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 64, (2, 3, SEQ)).astype(np.int32)  # [accum, micro, seq]
    lengths = np.array([[16, 9, 0], [4, 12, 7]])  # one all-padding row
    segment_ids = (np.arange(SEQ) < lengths[..., None]).astype(np.int32)
    labels = np.where(segment_ids > 0, ids, -100)
    labels[..., :3] = -100  # prompt tokens
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape).copy()
    batch = {k: jnp.asarray(v) for k, v in dict(input_ids=ids, labels=labels, segment_ids=segment_ids,
                                                  positions=positions).items()}
    _, metrics = jax.jit(make_train_step(graphdef, optimizer, schedule, loss_impl="chunked", max_segments=1))(
        state, frozen, batch)
    assert int(metrics["tokens"]) == lengths.sum() == 48
    assert int(metrics["label_tokens"]) == (labels != -100).sum() == 48 - 3 * 5


def test_rates_mfu_and_step_time_of_the_steps_since_the_last_read():
    devices = jax.devices()
    throughput = Throughput(flops_per_token=1e9, peak_tflops_per_device=100.0, devices=devices)
    for tokens, label_tokens in ((1500, 100), (500, 300)):
        throughput.add({"tokens": tokens, "label_tokens": label_tokens, "loss": 1.0})
    rates = throughput.rates(seconds=4.0)
    assert rates["tokens_per_sec"] == 500 and rates["label_tokens_per_sec"] == 100 and rates["step_time"] == 2.0
    assert rates["tokens_per_sec_per_device"] == 500 / len(devices)
    assert rates["mfu"] == pytest.approx(500 * 1e9 / (100e12 * len(devices)))
    assert "peak_memory_gib" not in rates  # the CPU backend reports no memory statistics
    throughput.add({"tokens": 10, "label_tokens": 5})
    assert throughput.rates(seconds=1.0)["tokens_per_sec"] == 10  # counting starts anew after each read
    assert "mfu" not in Throughput(1e9, None, devices).rates(1.0)  # unknown peak (CPU): no MFU


@pytest.mark.parametrize(("kind", "override", "peak"), [
    ("NVIDIA H100 80GB HBM3", None, 989.0), ("NVIDIA H100 PCIe", None, 756.0), ("NVIDIA H200", None, 790.0),
    ("NVIDIA A100-SXM4-80GB", None, 312.0), ("NVIDIA L4", None, 121.0), ("NVIDIA L40S", None, 362.0),
    ("cpu", None, None), ("NVIDIA H200", 989.0, 989.0), ("cpu", 1.5, 1.5),
])
def test_peak_table_matches_device_kinds_and_the_config_overrides_it(kind, override, peak):
    assert peak_tflops(kind, override) == peak
