"""ParallelDims validation: every invalid combination is a clear error naming the values."""

import pytest

from keye_train.distributed.parallel_dims import ParallelDims


def test_auto_dp_shard_fills_the_world():
    dims = ParallelDims(world_size=16, pp=2, tp=2)
    assert dims.dp_shard == 4 and dims.dp == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 6, "tp": 4}, "not divisible by pp\\*dp_replicate\\*cp\\*tp"),
        ({"world_size": 8, "tp": 2, "dp_shard": 3}, "!= world_size=8"),
        ({"world_size": 4, "cp": 0}, "parallel.cp=0"),
        ({"world_size": 2, "device_type": "tpu"}, "device_type"),
    ],
)
def test_invalid_degrees(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"world_size": 16, "tp": 16}, "does not divide the 8 KV heads"),
        ({"world_size": 16, "tp": 4, "cp": 4}, "tp\\*cp=4\\*4"),
        ({"world_size": 64, "pp": 64}, "exceeds the 36 decoder layers"),
    ],
)
def test_invalid_for_the_8b_model(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims(**kwargs).validate_for_model(num_layers=36, num_heads=32, num_kv_heads=8)
