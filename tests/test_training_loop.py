"""The shared training loop (vidsparse.training.loop) on a 4-parameter model: resume, cadences and
every fault-tolerance promise (non-finite stop, signals, atomic and verified checkpoints, torn log,
occupied or unwritable output)."""

import json
import os
import signal

import pytest
import torch

from vidsparse.training.loop import LoopConfig, list_checkpoints, prepare_out, train_loop


def _run(out, steps=6, *, resume=None, bad_at=None, signal_at=None, **cfg):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.arange(12.0).reshape(4, 3) / 10, torch.ones(4, 1)

    def backward(step):
        if signal_at is not None and step == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        loss = ((model(x + step) - y) ** 2).mean()
        if bad_at is not None and step >= bad_at:
            loss = loss * float("nan")
        loss.backward()
        return {"loss": loss.detach()}

    cfg = LoopConfig(out=out, steps=steps, ckpt_every=cfg.pop("ckpt_every", 2), log_every=cfg.pop("log_every", 2),
                     progress=False, resume=resume, **cfg)
    return model, train_loop(cfg, model=model, optimizer=opt, backward=backward)


def test_resume_repeats_the_straight_run(tmp_path):
    straight, r = _run(tmp_path / "a")
    assert r.step == 6 and r.stop_reason == "completed"
    _run(tmp_path / "b", stop_at=4)
    resumed, r2 = _run(tmp_path / "b", resume="auto")
    assert r2.resumed_from.name == "step-0000004.pt" and r2.step == 6
    assert torch.equal(straight.weight, resumed.weight)
    steps = [json.loads(l)["step"] for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-0000004.pt", "step-0000006.pt"]  # keep 2


def test_non_finite_loss_stops_before_saving_and_keeps_the_last_finite_checkpoint(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite loss, grad_norm by step 4.*step-0000002.pt"):
        _run(tmp_path, steps=10, bad_at=3, keep_checkpoints=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002.pt"]
    assert all(json.loads(l)["step"] <= 2 for l in (tmp_path / "log.jsonl").read_text().splitlines())


def test_sigterm_writes_a_checkpoint_and_returns(tmp_path):
    _, r = _run(tmp_path, steps=10, signal_at=2, ckpt_every=100)
    assert r.signal == "SIGTERM" and r.stop_reason.startswith("interrupted") and r.step == 3
    assert list_checkpoints(tmp_path)[-1].name == "step-0000003.pt"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path):
    _run(tmp_path, steps=4)
    latest = list_checkpoints(tmp_path)[-1]
    latest.write_bytes(latest.read_bytes()[:100])  # truncated mid-write by a crash
    assert not list(tmp_path.rglob("*.tmp"))  # saves went through a temp file and a rename
    with pytest.warns(RuntimeWarning, match="step-0000004.pt"):
        _, r = _run(tmp_path, steps=6, resume="auto")
    assert r.resumed_from.name == "step-0000002.pt" and r.step == 6


def test_torn_last_log_line_is_dropped_on_resume(tmp_path):
    _run(tmp_path, steps=4)
    with (tmp_path / "log.jsonl").open("a") as f:
        f.write('{"kind": "train", "st')
    with pytest.warns(RuntimeWarning, match="torn"):
        _run(tmp_path, steps=6, resume="auto")
    records = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]


def test_an_occupied_out_without_resume_is_an_error_naming_what_is_there(tmp_path):
    _run(tmp_path, steps=2)
    with pytest.raises(ValueError, match=r"already holds a run \(1 checkpoint\(s\), latest step-0000002.pt\).*--resume"):
        prepare_out(tmp_path, None)
    prepare_out(tmp_path, "auto")  # resuming is fine


def test_an_unwritable_out_is_an_error_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="--out .*file/run is not writable"):
        prepare_out(blocker / "run", None)
