"""The plain-loop recorder against a float64 autograd reference, on real SGD training."""

from __future__ import annotations

import pytest
import torch

from gramlin_analyze.errors import UsageError
from gramlin_analyze.record import Recorder, read_record, record_path
from tests.record.helpers import batches, mlp, reference_step, rel

WIDTHS = (6, 16, 12, 3)


def _train(model, data, rec, lr, *, micro=1):
    opt = rec.core.optimizers[0]
    for x, y in data:
        opt.zero_grad()
        for xs, ys in zip(x.chunk(micro), y.chunk(micro), strict=True):
            (torch.nn.functional.cross_entropy(model(xs), ys) / micro).backward()
        opt.step()


@pytest.mark.parametrize("mode", ["full", "diag"])
def test_vcs_sums_match_per_sample_autograd(mode):
    model = mlp(WIDTHS, seed=1)
    data = batches(4, 8, WIDTHS[0], WIDTHS[-1], seed=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    expected: dict[str, dict[str, torch.Tensor]] = {}
    with Recorder(model, opt, mode=mode) as rec:
        for x, y in data:
            for name, terms in reference_step(model, x, y, 0.3).items():
                for q, t in terms.items():
                    t = t if mode == "full" else torch.diagonal(t)
                    expected.setdefault(name, {}).setdefault(q, torch.zeros_like(t)).add_(t)
            _train(model, [(x, y)], rec, 0.3)
        got = rec.sums()
    assert rec.layers == ["0", "2", "4"]
    assert {s.route for s in rec.core.sums.values()} == {"gh", "wg"}
    for name, terms in expected.items():
        assert int(got[name]["steps"]) == 4 and int(got[name]["samples"]) == 32
        for q, t in terms.items():
            assert rel(got[name][q], t) < 1e-10, (name, q)


def test_first_plus_sgd_second_equals_gram_change_between_checkpoints(tmp_path):
    model = mlp(WIDTHS, seed=3)
    data = batches(7, 8, WIDTHS[0], WIDTHS[-1], seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    rec = Recorder(model, opt, mode={"2": "diag", "*": "full"}, sgd_terms=True)
    saved = {}
    for step, (x, y) in enumerate(data, start=1):
        _train(model, [(x, y)], rec, None)
        sched.step()
        if step in (2, 7):
            ckpt = tmp_path / f"step{step}.pt"
            torch.save(model.state_dict(), ckpt)
            saved[step] = (torch.load(ckpt), rec.save(ckpt))
    assert (
        saved[7][1]
        == record_path(tmp_path / "step7.pt")
        == tmp_path / "step7.gramlin_record.safetensors"
    )
    # a safetensors checkpoint is never overwritten: its record goes beside it
    model_file = tmp_path / "model.safetensors"
    assert rec.save(model_file) == tmp_path / "model.gramlin_record.safetensors"
    (w_a, path_a), (w_b, path_b) = saved[2], saved[7]
    rec_a, _ = read_record(path_a)
    rec_b, meta = read_record(path_b)
    assert meta["step"] == "7" and meta["plain_sgd"] == "true"
    for name in ("0", "2", "4"):
        Wa, Wb = w_a[f"{name}.weight"], w_b[f"{name}.weight"]
        actual = Wb.t() @ Wb - Wa.t() @ Wa
        if name == "2":
            actual = torch.diagonal(actual)
        d = {
            q: rec_b[f"{name}.{q}"] - rec_a[f"{name}.{q}"]
            for q in ("vcs_first", "sgd_second", "dgram")
        }
        assert rel(d["vcs_first"] + d["sgd_second"], actual) < 1e-8
        assert rel(d["dgram"], actual) < 1e-12
    trace = rec_b["__record__.lr_trace"]
    assert trace[:, 1].tolist() == [0.2, 0.1, 0.05]


def test_gradient_accumulation_equals_one_big_batch():
    data = batches(3, 8, WIDTHS[0], WIDTHS[-1], seed=5)
    results = []
    for micro in (1, 4):
        model = mlp(WIDTHS, seed=6)
        rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="full")
        _train(model, data, rec, 0.1, micro=micro)
        results.append(rec.sums())
    for name, terms in results[0].items():
        for q in ("vcs_first", "vcs_second", "dgram"):
            assert rel(results[1][name][q], terms[q]) < 1e-10, (name, q)


def test_grad_scaler_unscales_and_skipped_steps_leave_nothing():
    data = batches(3, 8, WIDTHS[0], WIDTHS[-1], seed=7, dtype=torch.float32)
    results = []
    for use_scaler in (False, True):
        model = mlp(WIDTHS, seed=8, dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=use_scaler)
        rec = Recorder(model, opt, mode="full", scaler=scaler if use_scaler else None)
        if use_scaler:  # an overflowing iteration: its step is skipped, its samples dropped
            x, y = data[0]
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
            scaler.step(opt)
            scaler.update()
        for x, y in data:
            opt.zero_grad()
            scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
            scaler.step(opt)
            scaler.update()
        assert rec.steps == 3
        results.append(rec.sums())
    for name, terms in results[0].items():
        for q in ("vcs_first", "vcs_second"):
            assert rel(results[1][name][q], terms[q]) < 1e-5, (name, q)


def test_float16_autocast_without_scaler_is_refused():
    model = mlp(WIDTHS, seed=9, dtype=torch.float32)
    Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(UsageError, match="GradScaler"):
        model(torch.randn(2, WIDTHS[0]))


def test_compiled_model_is_refused():
    model = mlp(WIDTHS, seed=10)
    with pytest.raises(UsageError, match="torch.compile"):
        Recorder(torch.compile(model))


def test_eval_and_no_grad_forwards_are_not_recorded():
    model = mlp(WIDTHS, seed=11)
    rec = Recorder(model, mode="diag")
    with torch.no_grad():
        model(torch.randn(4, WIDTHS[0], dtype=torch.float64))
    model.eval()
    torch.nn.functional.cross_entropy(
        model(torch.randn(4, WIDTHS[0], dtype=torch.float64)), torch.zeros(4, dtype=torch.long)
    ).backward()
    assert all(s.rows == 0 for s in rec.core.sums.values())
    with pytest.raises(UsageError, match="lr="):
        rec.step()


def test_resume_from_a_record_continues_the_sums(tmp_path):
    data = batches(6, 8, WIDTHS[0], WIDTHS[-1], seed=12)
    model = mlp(WIDTHS, seed=13)
    rec = Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="full", sgd_terms=True)
    _train(model, data, rec, 0.1)
    straight = rec.sums()
    rec.close()
    model = mlp(WIDTHS, seed=13)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = Recorder(model, opt, mode="full", sgd_terms=True)
    _train(model, data[:3], first, 0.1)
    saved = first.save(tmp_path / "half.pt")
    first.close()
    second = Recorder(model, opt, mode="full", sgd_terms=True)
    second.load(saved)
    _train(model, data[3:], second, 0.1)
    assert second.steps == 6
    for name, terms in straight.items():
        for q in ("vcs", "sgd_second", "dgram"):
            assert rel(second.sums()[name][q], terms[q]) < 1e-12, (name, q)


def test_attention_out_proj_is_left_out():
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    rec = Recorder(layer, mode="diag")
    assert rec.layers == ["linear1", "linear2"]


def test_scan_finds_the_checkpoints_not_their_records(tmp_path):
    """Records sit beside checkpoints; ingest's scan must not take them for checkpoints."""
    from gramlin_analyze.io.discovery import scan

    model = mlp(WIDTHS, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, opt)
    for step, (x, y) in enumerate(batches(3, 8, WIDTHS[0], WIDTHS[-1], seed=6), start=1):
        _train(model, [(x, y)], rec, None)
        torch.save(model.state_dict(), tmp_path / f"step{step}.pt")
        rec.save(tmp_path / f"step{step}.pt")
    assert len(list(tmp_path.glob("*.gramlin_record.safetensors"))) == 3
    result = scan(tmp_path)
    assert [s.step for s in result] == [1, 2, 3]
    assert all(s.path.suffix == ".pt" for s in result) and not result.skipped


def test_each_layer_takes_its_own_group_lr_as_groups_and_lrs_change():
    """Per-layer param groups, a group added mid-run and lrs changed by hand: every
    step's lr is its layer's group's lr at that step (the group lookup is cached)."""
    model = mlp(WIDTHS, seed=5)
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}],
        lr=0.3,
    )
    rec = Recorder(model, opt, layers=["0", "2"])
    data = batches(4, 8, WIDTHS[0], WIDTHS[-1], seed=6)
    _train(model, data[:2], rec, None)
    opt.add_param_group({"params": model[4].parameters(), "lr": 0.05})
    opt.param_groups[1]["lr"] = 0.2
    _train(model, data[2:], rec, None)
    got = rec.sums()
    assert float(got["0"]["lr_sum"]) == pytest.approx(4 * 0.1)
    assert float(got["2"]["lr_sum"]) == pytest.approx(2 * 0.3 + 2 * 0.2)
