"""Nothing lost, nothing mixed: run folders, rollbacks, corrupt and non-finite checkpoints,
config changes on resume, per-rank RNG streams, SIGTERM, and a step with no host sync."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from test_train import NaNAt, small_batches, tiny_config

from train import checkpoint as ckpt
from train.config import ConfigError
from train.logging_utils import read_jsonl
from train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steps(run_dir) -> list[int]:
    return [s for s, _ in ckpt.list_checkpoints(str(run_dir))]


def test_keep_last_never_deletes_the_file_just_written_after_a_resume(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "schedule.ckpt_every=2", "schedule.keep_last=2"),
          batches=small_batches())  # ckpt 4 and 6
    older = ckpt.checkpoint_path(str(run), 4)
    other = tmp_path / "other"  # resume the older file into a new folder: writes step 5, 6
    result = train(tiny_config(other, "schedule.ckpt_every=5", "schedule.keep_last=1"),
                   batches=small_batches(), resume=older)
    assert result.checkpoint and os.path.isfile(result.checkpoint)
    assert _steps(other) == [6]
    assert _steps(run) == [4, 6]  # the source run is untouched


def test_new_run_in_a_folder_with_checkpoints_is_refused_and_touches_nothing(tmp_path):
    train(tiny_config(tmp_path, "schedule.total_steps=2"), batches=small_batches())
    before = sorted(os.listdir(tmp_path))
    mtimes = {n: os.path.getmtime(tmp_path / n) for n in before}
    with pytest.raises(ConfigError, match="--resume.*another run.dir.*--fresh"):
        train(tiny_config(tmp_path, "schedule.total_steps=4"), batches=small_batches())
    assert sorted(os.listdir(tmp_path)) == before
    assert {n: os.path.getmtime(tmp_path / n) for n in before} == mtimes
    fresh = train(tiny_config(tmp_path, "schedule.total_steps=3"), batches=small_batches(),
                  fresh=True)
    archived = [d for d in os.listdir(tmp_path) if d.startswith("previous-")]
    assert fresh.step == 3 and len(archived) == 1
    assert os.listdir(tmp_path / archived[0]) and _steps(tmp_path) == [3]


def test_rollback_moves_the_abandoned_timeline_aside(tmp_path):
    sets = ("schedule.total_steps=8", "schedule.ckpt_every=2", "schedule.keep_last=10")
    train(tiny_config(tmp_path, *sets), batches=small_batches())
    assert _steps(tmp_path) == [2, 4, 6, 8]
    train(tiny_config(tmp_path, *sets), batches=small_batches(),
          resume=ckpt.checkpoint_path(str(tmp_path), 4), stop_after=1)  # the new timeline: 5
    abandoned = [d for d in os.listdir(tmp_path) if d.startswith("abandoned-")]
    assert len(abandoned) == 1
    assert sorted(f for f in os.listdir(tmp_path / abandoned[0]) if f.endswith(".pt")) == [
        "ckpt-00000006.pt", "ckpt-00000008.pt"]
    assert _steps(tmp_path) == [2, 4, 5]
    again = train(tiny_config(tmp_path, *sets), batches=small_batches(), resume=True,
                  stop_after=1)
    assert again.step == 6  # continued the new timeline, from 5


def _flip_bytes(path: str, count: int = 64) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        for i in range(count):
            f.seek(size // 2 + 97 * i)
            byte = f.read(1)
            f.seek(size // 2 + 97 * i)
            f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_resume_skips_a_corrupt_newest_checkpoint_and_says_why(tmp_path, damage, capsys):
    sets = ("schedule.total_steps=4", "schedule.ckpt_every=2", "schedule.keep_last=5")
    train(tiny_config(tmp_path, *sets), batches=small_batches())
    newest = ckpt.checkpoint_path(str(tmp_path), 4)
    if damage == "flip":
        _flip_bytes(newest)
    else:
        with open(newest, "r+b") as f:
            f.truncate(0 if damage == "empty" else os.path.getsize(newest) // 2)
    with pytest.raises(ckpt.CorruptCheckpointError, match="ckpt-00000004.pt"):
        ckpt.load_checkpoint(newest)
    result = train(tiny_config(tmp_path, *sets), batches=small_batches(), resume=True)
    out = capsys.readouterr().out
    assert "skipped" in out and "ckpt-00000004.pt" in out
    start = [r for r in read_jsonl(result.metrics) if r["event"] == "start"][-1]
    assert start["resumed_from"].endswith("ckpt-00000002.pt") and result.step == 4


def test_orphaned_temporaries_of_a_killed_save_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    orphan = tmp_path / f".ckpt-00000002.pt.tmp-{dead}"
    orphan.write_bytes(b"half a checkpoint")
    live = tmp_path / f".ckpt-00000002.pt.tmp-{os.getpid()}"  # a writer still running
    live.write_bytes(b"in progress")
    assert ckpt.remove_orphaned_temporaries(str(tmp_path)) == [orphan.name]
    assert not orphan.exists() and live.exists()


def test_non_finite_weights_are_never_saved_as_the_last_good_checkpoint(tmp_path):
    sets = ("schedule.total_steps=4", "schedule.ckpt_every=2", "optim.warmup_steps=0")
    train(tiny_config(tmp_path, *sets), batches=small_batches(), stop_after=2)
    good = ckpt.checkpoint_path(str(tmp_path), 2)
    result = train(tiny_config(tmp_path, *sets, "optim.lr=1e38"), batches=small_batches(),
                   resume=True, allow_config_change=True)
    assert _steps(tmp_path) == [2]
    assert result.checkpoint == good
    events = [r["event"] for r in read_jsonl(result.metrics)]
    assert "nonfinite_weights" in events


def test_resume_refuses_a_changed_batch_or_seed_and_logs_other_changes(tmp_path):
    train(tiny_config(tmp_path), batches=small_batches(), stop_after=2)
    with pytest.raises(ConfigError, match=r"schedule.batch_size: 8 -> 4"):
        train(tiny_config(tmp_path, "schedule.batch_size=4"), batches=small_batches(4),
              resume=True)
    with pytest.raises(ConfigError, match=r"run.seed"):
        train(tiny_config(tmp_path, "run.seed=5"), batches=small_batches(), resume=True)
    result = train(tiny_config(tmp_path, "schedule.log_every=2"), batches=small_batches(),
                   resume=True)
    assert any("schedule.log_every: 1 -> 2" in n for n in result.notes)
    before = json.loads((tmp_path / "config-until-step00000002.json").read_text())
    after = json.loads((tmp_path / "config.json").read_text())
    assert (before["schedule"]["log_every"], after["schedule"]["log_every"]) == (1, 2)


def test_a_one_rank_checkpoint_on_two_ranks_gives_each_rank_its_own_stream():
    from train.loop import restore_rng

    saved = [ckpt.capture_rng_state()]
    expected = torch.rand(4)
    assert restore_rng(saved, seed=0, step=3, rank=0, world_size=1) == []
    assert torch.equal(torch.rand(4), expected)  # same world size: exactly where it was
    draws, notes = [], []
    for rank in (0, 1):
        notes += restore_rng(saved, seed=0, step=3, rank=rank, world_size=2)
        draws.append(torch.rand(4))
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], expected)
    assert len(notes) == 2 and "own new stream" in notes[0]


def test_sigterm_finishes_the_step_saves_and_exits_non_zero(tmp_path):
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        import torch
        torch.set_num_threads(1)
        from test_train import small_batches, tiny_config
        from train.loop import TrainingInterrupted, train
        cfg = tiny_config({str(run)!r}, "schedule.total_steps=100000", "schedule.ckpt_every=0",
                          "run.compile='off'")
        try:
            train(cfg, batches=small_batches())
        except TrainingInterrupted as exc:
            print("interrupted", exc.signum, exc.checkpoint, flush=True)
            sys.exit(128 + exc.signum)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    try:
        deadline = time.monotonic() + 60
        metrics = str(run / "metrics.jsonl")
        while len(read_jsonl(metrics)) < 3:  # a start record and two steps logged
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM
    assert out.splitlines()[-1].startswith("interrupted 15")  # after the set-up's lines
    saved = ckpt.list_checkpoints(str(run))
    assert len(saved) == 1 and saved[0][1] in out
    state = ckpt.load_checkpoint(saved[0][1])
    assert state["step"] == saved[0][0] >= 2


def test_a_sigterm_during_the_final_save_is_absorbed_and_the_save_completes(tmp_path):
    """torchrun signals each rank separately: one rank's SIGTERM can land after the ranks
    agreed to stop, while they save together. The default action there killed the rank
    mid-save (and its peer with it), so the handlers must outlive the save."""
    run = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
        import torch
        torch.set_num_threads(1)
        from test_train import small_batches, tiny_config
        from train import checkpoint as ckpt
        from train.loop import train
        real_save = ckpt.save_checkpoint
        def save_under_a_late_signal(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGTERM)
            return real_save(*args, **kwargs)
        ckpt.save_checkpoint = save_under_a_late_signal
        cfg = tiny_config({str(run)!r}, "schedule.total_steps=2", "schedule.ckpt_every=0")
        result = train(cfg, batches=small_batches())
        print("finished", result.step, result.checkpoint, flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    saved = ckpt.list_checkpoints(str(run))
    assert [s for s, _ in saved] == [2] and f"finished 2 {saved[0][1]}" in proc.stdout
    ckpt.load_checkpoint(saved[0][1])


def test_a_steady_state_step_makes_no_host_sync(tmp_path, monkeypatch):
    """Counts the ways Python reads a tensor's value; only log steps may read."""
    calls: list[str] = []
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "numpy"):
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _name=name, _orig=original, **kwargs):
            calls.append(_name)
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    from train import loop

    steps_seen: list[tuple[int, int]] = []
    real_periodic = loop._periodic

    def spy(s, p, window, bar, plan, elapsed):
        before = len(calls)
        real_periodic(s, p, window, bar, plan, elapsed)
        steps_seen.append((p.step, len(calls) - before))

    real_call = loop.TrainStep.__call__

    def counted_step(self, *args, **kwargs):
        before = len(calls)
        out = real_call(self, *args, **kwargs)
        steps_seen.append((-1, len(calls) - before))
        return out

    monkeypatch.setattr(loop, "_periodic", spy)
    monkeypatch.setattr(loop.TrainStep, "__call__", counted_step)
    train(tiny_config(tmp_path, "schedule.total_steps=8", "schedule.log_every=4"),
          batches=small_batches())
    in_steps = [n for k, n in steps_seen if k == -1]
    assert len(in_steps) == 8 and in_steps[1:] == [0] * 7  # the first call sets part names
    periodic = dict((k, n) for k, n in steps_seen if k >= 0)
    assert all(periodic[k] == 0 for k in (1, 2, 3, 5, 6, 7))
    assert periodic[4] > 0 and periodic[8] > 0  # the log steps read once


def test_nonfinite_steps_are_skipped_on_device_even_between_log_steps(tmp_path):
    result = train(tiny_config(tmp_path, "schedule.total_steps=6", "schedule.log_every=3"),
                   batches=NaNAt(small_batches(), bad={1, 4}))
    assert result.step == 6 and result.skipped_steps == 2
    state = ckpt.load_checkpoint(result.checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["step"] for r in read_jsonl(result.metrics) if r["event"] == "nonfinite"] == [1, 4]
    assert json.loads((tmp_path / "config.json").read_text())["schedule"]["log_every"] == 3


def test_a_time_bounded_run_plans_its_schedules_from_the_measured_rate(monkeypatch):
    from train import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "monotonic", lambda: now[0])
    planned = loop.PlannedLength(total=20_000, max_minutes=1.0, start_step=0)
    assert planned(0) == 20_000  # nothing measured yet
    now[0] += 6.0  # 10 steps in 6 s: the 60 s budget fits 100
    assert planned(10) == 100 and not planned.over_budget()
    now[0] += 54.0
    assert planned.over_budget() and planned(100) == 101
    by_steps = loop.PlannedLength(total=500, max_minutes=0.0, start_step=0)
    now[0] += 1000.0
    assert by_steps(400) == 500 and not by_steps.over_budget()


def test_a_full_disk_fails_the_save_cleanly_and_keeps_earlier_checkpoints(tmp_path, monkeypatch,
                                                                         capsys):
    import errno

    from sddit.cli import main

    config = os.path.join(ROOT, "configs", "tiny.toml")
    common = ["train", "--config", config, "--set", f"run.dir={json.dumps(str(tmp_path))}",
              "--set", "model.overrides={hidden_size=32, depth=2, num_heads=2, patch_size=8, "
              "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}",
              "--set", "schedule.batch_size=8", "--set", "schedule.ckpt_every=1",
              "--set", "run.progress_bar=false", "--set", "schedule.sample_per_class=1",
              "--set", "schedule.sample_steps=2"]
    assert main(common + ["--set", "schedule.total_steps=1"]) == 0
    first = ckpt.list_checkpoints(str(tmp_path))
    real_save = torch.save

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    assert main(common + ["--set", "schedule.total_steps=2", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "untouched" in err and "Traceback" not in err
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert ckpt.list_checkpoints(str(tmp_path)) == first
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    ckpt.load_checkpoint(first[-1][1])


@pytest.mark.timeout(170)
def test_sigterm_under_torchrun_saves_one_checkpoint_agreed_by_both_ranks(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "sddit", "train",
           "--config", os.path.join(ROOT, "configs", "tiny.toml"),
           "--set", f"run.dir={json.dumps(str(run))}", "--set", "run.device='cpu'",
           "--set", "model.overrides={hidden_size=32, depth=2, num_heads=2, patch_size=8, "
           "head_hidden_dim=32, head_bottleneck_dim=16, n_prototypes=32}",
           "--set", "schedule.batch_size=8", "--set", "schedule.total_steps=100000",
           "--set", "schedule.ckpt_every=0", "--set", "schedule.log_every=1",
           "--set", "run.progress_bar=false", "--set", "run.compile='off'"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 100
        while len([r for r in read_jsonl(str(run / "metrics.jsonl"))
                   if r["event"] == "train"]) < 2:
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, out
    saved = ckpt.list_checkpoints(str(run))
    assert len(saved) == 1, out
    state = ckpt.load_checkpoint(saved[0][1])
    assert len(state["rng"]) == 2 and state["step"] == saved[0][0] >= 2
    end = [r for r in read_jsonl(str(run / "metrics.jsonl")) if r["event"] == "end"]
    assert end and end[-1]["stopped_by"] == "signal"


def step_values(lr: float, teacher_momentum: float, ema_beta: float, net: torch.nn.Module):
    """A step's train.schedule.StepValues with these scalars and a teacher temperature
    (0.0625) that fp32 holds exactly, like them."""
    from model import LossInputs
    from train.schedule import StepValues

    return StepValues(lr, ema_beta, teacher_momentum,
                      LossInputs(mask_ratio=net.config.mask_ratio, teacher_temperature=0.0625))


def test_the_graphed_step_body_equals_the_eager_step_on_cpu(tmp_path):
    """run.cuda_graphs replays TrainStep's own body through static buffers and tensor
    scalars; without a GPU the same plumbing runs eagerly and must match the plain step
    bit for bit (scalars exactly representable in fp32, as a tensor holds them)."""
    from train import loop
    from train.distributed import DistInfo
    from train.graphs import GraphedStep, check_cuda_graphs

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = tiny_config(tmp_path, "run.fused_optimizer='off'")
    runs = []
    for graphed in (False, True):
        s = loop.set_up(cfg, info, None, small_batches(), [])
        step = GraphedStep(s.step_fn, capture=False) if graphed else s.step_fn
        stream = loop.DataStream(s.batches)
        torch.manual_seed(1)
        stats = []
        for k in range(4):
            x, y = stream.next()
            if k == 2:  # a skipped step goes through the same device-side path
                x = torch.full_like(x, float("nan"))
            stats.append(step(x, y, step_values(2.0**-10 * (k + 1), 0.75, 0.5, s.net)))
        runs.append((torch.stack(stats), s.net.state_dict(), s.ema.module.state_dict()))
    (stats_a, net_a, ema_a), (stats_b, net_b, ema_b) = runs
    assert torch.equal(stats_a.nan_to_num(-1), stats_b.nan_to_num(-1))
    assert stats_a[2, -1] == 0 and stats_a[3, -1] == 1  # skipped, then applied
    for a, b in ((net_a, net_b), (ema_a, ema_b)):
        assert all(torch.equal(a[k], b[k]) for k in a)
    on = tiny_config(tmp_path, "run.cuda_graphs=true")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        check_cuda_graphs(on, torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="one GPU"):
        check_cuda_graphs(on, torch.device("cuda", 0), 2)
    with pytest.raises(ConfigError, match="mask_ratio_jitter"):
        check_cuda_graphs(tiny_config(tmp_path, "run.cuda_graphs=true",
                                      'model.name="MDT-tiny"',
                                      "model.overrides={mask_ratio_jitter=0.2}"),
                          torch.device("cuda", 0), 1)


@pytest.mark.gpu
def test_a_captured_cuda_graph_step_replays_the_eager_step(tmp_path):
    """On a GPU, run.cuda_graphs for real: warm-up steps, capture, then replays fed new
    batches and new scalars. Against the eager step from the same weights and seed: the
    same losses (bf16 autocast; flash backward may use atomics, so not bit for bit), the
    same skip decisions, a NaN batch that leaves the weights untouched inside the graph,
    and the same net change of the weights (which a stale lr or batch would not give)."""
    from train import loop
    from train.distributed import DistInfo
    from train.graphs import WARMUP_STEPS, GraphedStep

    device = torch.device("cuda", torch.cuda.current_device())
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    nan_step, n_steps = WARMUP_STEPS + 2, WARMUP_STEPS + 5

    def weights(net: torch.nn.Module) -> torch.Tensor:
        return torch.cat([p.detach().float().flatten() for p in net.parameters()])

    runs = []
    for graphed in (False, True):
        cfg = tiny_config(tmp_path / f"graphed-{graphed}", "run.device='cuda'",
                          "run.fused_optimizer='off'", f"run.cuda_graphs={str(graphed).lower()}")
        s = loop.set_up(cfg, info, None, small_batches(), [])
        assert isinstance(s.step_fn, GraphedStep) == graphed
        start, stream, stats = weights(s.net), loop.DataStream(s.batches), []
        torch.manual_seed(1)
        for k in range(n_steps):
            x, y = (t.to(device) for t in stream.next())
            if k == nan_step:
                x, before = torch.full_like(x, float("nan")), weights(s.net)
            stats.append(s.step_fn(x, y, step_values(2.0**-10 * (k + 1), 0.75, 0.5, s.net)))
            if k == nan_step:
                assert torch.equal(weights(s.net), before), f"graphed={graphed}"
        torch.cuda.synchronize()
        runs.append((torch.stack(stats).cpu(), start, weights(s.net)))
    (stats_e, start_e, end_e), (stats_g, start_g, end_g) = runs
    assert torch.equal(start_e, start_g)
    assert stats_e[:, -1].tolist() == stats_g[:, -1].tolist()
    assert stats_g[nan_step, -1] == 0 and stats_g[nan_step + 1:, -1].eq(1).all()
    finite = stats_e[:, -1] == 1
    torch.testing.assert_close(stats_g[finite, 0], stats_e[finite, 0], rtol=2e-2, atol=1e-3)
    change_e, change_g = end_e - start_e, end_g - start_g
    assert (change_g - change_e).norm() < 0.05 * change_e.norm()
