"""The `profile` config section writes a jax.profiler trace of the chosen steps; the model's blocks carry named scopes."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from automodel_jax import AutoModelForCausalLM
from automodel_jax.config import ConfigError
from automodel_jax.training.profile import StepProfiler, profile_defaults

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_trace_of_chosen_steps_lands_in_run_dir(tmp_path):
    cfg = profile_defaults()
    cfg.update(enabled=True, start_step=1, num_steps=2)
    profiler = StepProfiler(cfg, tmp_path)
    step = jax.jit(lambda x: x * 2.0)
    state = jnp.ones(4)
    for i in range(5):
        profiler.before(i, state)
        state = step(state)
        assert profiler.active == (1 <= i < 3)
    profiler.close(state)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1


def test_disabled_profiler_writes_nothing(tmp_path):
    profiler = StepProfiler(profile_defaults(), tmp_path)
    profiler.before(3, jnp.ones(2))
    profiler.close(jnp.ones(2))
    assert not (tmp_path / "profile").exists()


@pytest.mark.parametrize("bad", [dict(start_step=-1), dict(num_steps=0)])
def test_bad_profile_config_is_an_error(tmp_path, bad):
    cfg = ml_collections.ConfigDict({**profile_defaults().to_dict(), **bad})
    with pytest.raises(ConfigError, match="profile"):
        StepProfiler(cfg, tmp_path)


def test_compiled_model_reads_like_the_model():
    model = AutoModelForCausalLM.from_config(TINY)
    hlo = jax.jit(lambda ids: model(ids)).lower(jnp.zeros((1, 8), jnp.int32)).as_text(debug_info=True)
    for scope in ("model/layers.0/self_attn", "model/layers.1/mlp", "model/embed_tokens", "model/norm"):
        assert scope in hlo, scope
