"""Training parity with the reference: 20 steps of LoRA (vs torch + HF PEFT) and of full SFT with AdamW (vs torch),
from the same weights on the same batches with the same hyperparameters, in float32. Loss curves agree within 1e-4
relative at every step. Two micro-batches per step with different label counts check NeMo Automodel's normalisation
(sum over the global batch's label tokens / their number)."""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from automodel_jax import AutoModelForCausalLM
from automodel_jax.peft.lora import adapters, apply_lora
from automodel_jax.training.optim import build_optimizer, optim_defaults
from automodel_jax.parallel.sharding import tree_shardings
from automodel_jax.peft.lora import split_model
from automodel_jax.training.step import init_state, make_train_step
from automodel_jax.parallel.sharding import make_mesh

STEPS, ACCUM, MICRO, SEQ, VOCAB = 20, 2, 2, 12, 101
WD, CLIP = 0.01, 1.0


def _batches():
    rng = np.random.RandomState(0)
    out = []
    for _ in range(STEPS):
        ids = rng.randint(0, VOCAB, (ACCUM, MICRO, SEQ)).astype(np.int32)
        labels = (ids * 3 + 1) % VOCAB  # a learnable target
        segment = np.ones_like(ids)
        lengths = rng.randint(6, SEQ + 1, (ACCUM, MICRO))
        for a in range(ACCUM):
            for m in range(MICRO):
                segment[a, m, lengths[a, m]:] = 0
                labels[a, m, :rng.randint(1, 4)] = -100  # prompt tokens
        labels[segment == 0] = -100
        positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), ids.shape).copy()
        out.append(dict(input_ids=ids, labels=labels, segment_ids=segment, positions=positions))
    return out


def _optim_cfg(lr):
    cfg = optim_defaults()
    cfg.update(name="adamw", learning_rate=lr, weight_decay=WD, grad_clip=CLIP, eps=1e-8)
    return cfg


def _jax_losses(model, lora, lr):
    optimizer, schedule = build_optimizer(_optim_cfg(lr), STEPS)
    graphdef, trainable, frozen = split_model(model, lora)
    mesh = make_mesh()
    state, _ = init_state(trainable, optimizer, 0, tree_shardings(model, trainable, mesh))
    step = jax.jit(make_train_step(graphdef, optimizer, schedule, loss_impl="chunked", max_segments=1))
    losses = []
    for batch in _batches():
        state, metrics = step(state, frozen, {k: jnp.asarray(v) for k, v in batch.items()})
        losses.append(float(metrics["loss"]))
    return np.array(losses)


def _torch_losses(model, params, lr):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WD, eps=1e-8)
    losses = []
    for batch in _batches():
        opt.zero_grad()
        total = int((batch["labels"] != -100).sum())
        loss_sum = 0.0
        for a in range(ACCUM):
            logits = model(torch.tensor(batch["input_ids"][a], dtype=torch.long),
                           attention_mask=torch.tensor(batch["segment_ids"][a])).logits
            part = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB),
                                                     torch.tensor(batch["labels"][a].reshape(-1), dtype=torch.long),
                                                     ignore_index=-100, reduction="sum")
            (part / total).backward()
            loss_sum += float(part.detach())
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        losses.append(loss_sum / total)
    return np.array(losses)


def test_lora_training_matches_hf_peft(hf_llama_factory):
    import peft
    hf, path = hf_llama_factory(vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_pretrained(path)
    apply_lora(model, r=4, alpha=8.0, target_modules=("*_proj",), seed=3)
    ref = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ours = adapters(model)
    for name, module in ref.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            a, b = ours[name.removeprefix("base_model.model.")]
            module.lora_A["default"].weight.data = torch.tensor(np.asarray(a).T.copy())
            module.lora_B["default"].weight.data = torch.tensor(np.asarray(b).T.copy())
    ref.train()
    want = _torch_losses(ref, [p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    got = _jax_losses(model, lora=True, lr=1e-2)
    assert want[-1] < want[0] * 0.97  # it trains
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_full_sft_adamw_matches_torch(hf_llama_factory):
    hf, path = hf_llama_factory(vocab_size=VOCAB)
    model = AutoModelForCausalLM.from_pretrained(path)
    hf.train()
    want = _torch_losses(hf, list(hf.parameters()), lr=2e-3)
    got = _jax_losses(model, lora=False, lr=2e-3)
    assert want[-1] < want[0] * 0.9
    np.testing.assert_allclose(got, want, rtol=1e-4)
