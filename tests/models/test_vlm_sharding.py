"""VLM training under sharding: full SFT (vision tower included) for 3 steps on 8 simulated devices, fsdp=8 and
fsdp=4 x tensor=2, equals one device (vlm_batch_program.py train, in a fresh process)."""
import pytest

from vlm_batch_program import run  # tests/models is on sys.path (pytest prepend import mode)


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_5_vl"])
def test_three_training_steps_on_fsdp_and_fsdp_x_tensor_equal_one_device(model_type):
    record = run(model_type, "train")
    assert record["devices"] == 8 and record["losses"][-1] < record["losses"][0]
    for mesh in ("fsdp8", "fsdp4_tensor2"):
        assert record[mesh]["loss_diff"] < 1e-5 and record[mesh]["param_diff"] < 1e-5, (mesh, record[mesh])
