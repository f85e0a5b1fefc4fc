"""How long a collective waits, in every process group (the hung-rank case itself: test_resume.py)."""
from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from conftest import free_port
from graspGPT.config import ConfigError, config_from_dict
from graspGPT.distributed import collective_timeout, lost_rank_message, peer_lost, time_out_every_group


def group_timeout(group) -> timedelta:
    return group._get_backend(torch.device("cpu")).options._timeout


@pytest.fixture
def torch_defaults():
    """Put torch's defaults back after a test that changes them."""
    saved = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    yield
    c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = saved


def test_the_timeout_setting(monkeypatch):
    monkeypatch.delenv("DEEPSPEED_TIMEOUT", raising=False)
    assert collective_timeout(None) == timedelta(minutes=15)
    assert collective_timeout(0.5) == timedelta(seconds=30)
    monkeypatch.setenv("DEEPSPEED_TIMEOUT", "40")  # DeepSpeed's variable, when the config leaves it unset
    assert collective_timeout(None) == timedelta(minutes=40) and collective_timeout(2) == timedelta(minutes=2)
    assert config_from_dict({"system": {"collective_timeout_min": 1}}).system.collective_timeout_min == 1.0
    with pytest.raises(ConfigError, match="collective_timeout_min must be > 0"):
        config_from_dict({"system": {"collective_timeout_min": 0}})


def test_groups_made_like_deepspeeds_get_the_timeout(torch_defaults):
    """DeepSpeed makes its ZeRO groups with torch.distributed.new_group(ranks) and no timeout: torch gives
    them its default (30 min for gloo) unless time_out_every_group changed it first."""
    timeout = timedelta(seconds=42)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=timeout)
    try:
        assert group_timeout(dist.new_group([0])) == timedelta(minutes=30)  # torch's default: the old hang
        time_out_every_group(timeout)
        assert group_timeout(dist.new_group([0])) == timeout
        assert group_timeout(c10d._get_default_group()) == timeout
    finally:
        dist.destroy_process_group()


def test_what_a_surviving_rank_says():
    timed_out = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 9000ms for recv operation "
                             "to complete")
    reset = RuntimeError("[gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:1234: Connection reset by peer")
    assert peer_lost(timed_out) and peer_lost(reset) and not peer_lost(RuntimeError("CUDA out of memory"))
    line = lost_rank_message(timed_out)
    assert "timed out" in line and "system.collective_timeout_min" in line and "--resume auto" in line
    assert "\n" not in line
    assert "another rank stopped or stalled" in lost_rank_message(reset)
