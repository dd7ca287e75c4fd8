"""torchrun's environment is checked before any rank joins the process group."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from cgmq_cli import distributed
from cgmq_cli.errors import UsageError


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, rank: int, per_node: int) -> list[str]:
    for key, value in {"WORLD_SIZE": per_node, "RANK": rank, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": per_node}.items():
        monkeypatch.setenv(key, str(value))
    joined: list[str] = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: joined.append(f"set_device {index}"))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: joined.append("init_process_group"))
    return joined


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_refuses_more_processes_than_gpus(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    # Seen on a one-GPU machine with --nproc_per_node 2: rank 1 failed, and rank 0, whose GPU exists, joined
    # the group and hung until torchrun killed it. Now both fail at once with the same message.
    joined = _torchrun_env(monkeypatch, rank, per_node=2)
    with pytest.raises(UsageError, match=r"started 2 processes on this node but it has 1 GPU \(") as err:
        distributed.from_env("cuda")
    assert "--nproc_per_node 1" in err.value.hint
    assert joined == []


def test_as_many_processes_as_gpus_join(monkeypatch: pytest.MonkeyPatch) -> None:
    joined = _torchrun_env(monkeypatch, 0, per_node=1)
    monkeypatch.setenv("WORLD_SIZE", "2")  # two nodes of one GPU each
    ctx = distributed.from_env("cuda")
    assert joined == ["set_device 0", "init_process_group"]
    assert (ctx.rank, ctx.world, ctx.device) == (0, 2, "cuda:0")
