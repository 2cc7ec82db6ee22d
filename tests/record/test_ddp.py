"""Two-process DDP (gloo): the record is of the global batch, equal to one process's record."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gramlin_analyze.record import Recorder, read_record
from tests.record.helpers import batches, mlp, rel

WIDTHS = (5, 12, 7, 3)
LR = 0.25


def _data():
    return batches(4, 8, WIDTHS[0], WIDTHS[-1], seed=21)


def _run(model, optimizer, rec, data):
    for x, y in data:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return rec


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)  # as DataLoader workers do after a fork
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        net = mlp(WIDTHS, seed=20)
        model = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        rec = Recorder(model, opt, mode={"2": "diag", "*": "full"}, sgd_terms=True)
        local = [(x.chunk(2)[rank], y.chunk(2)[rank]) for x, y in _data()]
        _run(model, opt, rec, local)
        written = rec.save(out)
        assert (written is not None) == (rank == 0)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_ddp_record_equals_single_process(tmp_path):
    out = tmp_path / "ddp.gramlin_record.safetensors"
    # fork: the workers share the parent's imports (spawn re-imports torch: slow on CI machines)
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=2, start_method="fork")
    ddp, meta = read_record(out)
    assert meta["world_size"] == "2"
    model = mlp(WIDTHS, seed=20)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    rec = _run(
        model, opt, Recorder(model, opt, mode={"2": "diag", "*": "full"}, sgd_terms=True), _data()
    )
    single = rec.sums()
    assert {s.route for s in rec.core.sums.values()} == {"gh", "wg"}
    for name, terms in single.items():
        for q in ("vcs", "vcs_first", "vcs_second", "sgd_second", "dgram"):
            assert rel(ddp[f"{name}.{q}"], terms[q]) < 1e-10, (name, q)
        assert int(ddp[f"{name}.samples"]) == 32 and int(ddp[f"{name}.steps"]) == 4
