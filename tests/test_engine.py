"""The one training engine: resume, checkpoints, two models with two optimizers, best/plateau handlers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dualsynth.engine import (
    Engine,
    Plateau,
    epoch_batches,
    improved,
    iteration_seed,
    scheduled_lr,
    step_batch,
)
from dualsynth.io import read_csv
from dualsynth.runs import RunFolder

DATA = torch.randn(64, 6)


def _gan_run(path, stop_after=None, resume=False, total=12):
    """A step with two models and two optimizers, as an adversarial VQ-VAE or a mask-to-image generator needs:
    the generator and the critic update in turn, with dropout and random batches in every step."""
    run = RunFolder.create(path, {"what": "gan"}, kind="test", resume=resume)
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 6))
    critic = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    engine = Engine(run, torch.device("cpu"), models={"gen": gen, "critic": critic},
                    optimizers={"main": torch.optim.Adam(gen.parameters(), 1e-2),
                                "critic": torch.optim.Adam(critic.parameters(), 1e-2)},
                    seed=3, total=total, unit="step", precision="fp32")
    if resume:
        engine.resume()

    def update(step):
        x = DATA[step_batch(len(DATA), 8, 3, step)]
        fake = gen(x)
        engine.optimize(torch.relu(1 + critic(fake.detach())).mean() + torch.relu(1 - critic(x)).mean(), "critic")
        g_loss = -critic(fake).mean() + ((fake - x) ** 2).mean()
        engine.optimize(g_loss)
        engine.accumulate({"g_loss": g_loss.item()})

    def after(step, _):
        if (step + 1) % 4 == 0:
            row = {"step": step + 1, **engine.window_means()}
            engine.log(row)
            engine.keep_if_best(row["g_loss"], "min")

    engine.run_loop(update, after, checkpoint_every=5, stop_after=stop_after, progress=False)
    return engine, gen, critic


def test_two_models_two_optimizers_resume_bit_identically(tmp_path):
    _, gen_a, critic_a = _gan_run(tmp_path / "straight")
    engine, _, _ = _gan_run(tmp_path / "stopped", stop_after=7)
    assert engine.done == 7 and not engine.finished
    ckpt = RunFolder(tmp_path / "stopped").load_checkpoint("last")
    assert set(ckpt["optimizers"]) == {"main", "critic"} and set(ckpt["modules"]) == {"critic"}
    assert ckpt["train_state"]["step"] == 7
    engine, gen_b, critic_b = _gan_run(tmp_path / "stopped", resume=True)
    assert engine.done == 12 and engine.finished
    for a, b in zip([*gen_a.parameters(), *critic_a.parameters()], [*gen_b.parameters(), *critic_b.parameters()]):
        assert torch.equal(a, b)
    # the log of the resumed run equals the straight one (the window at step 7 was kept in the checkpoint)
    assert read_csv(tmp_path / "straight" / "log.csv") == read_csv(tmp_path / "stopped" / "log.csv")


def test_best_checkpoint_holds_the_first_model_and_the_best_value(tmp_path):
    engine, gen, _ = _gan_run(tmp_path / "run")
    best = RunFolder(tmp_path / "run").load_checkpoint("best")
    rows = read_csv(tmp_path / "run" / "log.csv")
    losses = [float(r["g_loss"]) for r in rows]
    assert engine.state["best"] == pytest.approx(min(losses), rel=1e-5)  # log.csv keeps 6 digits
    assert best["step"] == engine.state["best_at"] == int(rows[int(np.argmin(losses))]["step"])
    assert set(best["model"]) == set(gen.state_dict())


def test_ctrl_c_finishes_the_iteration_checkpoints_it_and_reraises(tmp_path):
    import os
    import signal

    run = RunFolder.create(tmp_path / "run", {}, kind="test")
    model = torch.nn.Linear(2, 1)
    engine = Engine(run, torch.device("cpu"), models={"m": model},
                    optimizers={"main": torch.optim.SGD(model.parameters(), 0.1)}, seed=0, total=10)
    updates = []

    def update(step):
        engine.optimize(model(torch.ones(1, 2)).sum())
        if step == 3:  # Ctrl-C in the middle of an iteration (an epoch of the U-Net: many updates)
            os.kill(os.getpid(), signal.SIGINT)
        engine.optimize(model(torch.ones(1, 2)).sum())
        updates.append(step)

    # as in an interactive shell (a background job, as CI may run the tests, starts with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.run_loop(update, checkpoint_every=100, progress=False)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    finally:
        signal.signal(signal.SIGINT, before)
    assert updates == [0, 1, 2, 3]  # iteration 3 ran to its end, iteration 4 never started
    ckpt = run.load_checkpoint("last")
    assert ckpt["train_state"]["step"] == 4 and torch.equal(ckpt["model"]["weight"], model.weight.detach())


def test_each_iteration_is_seeded_from_seed_and_number(tmp_path):
    run = RunFolder.create(tmp_path / "run", {}, kind="test")
    model = torch.nn.Linear(1, 1)
    engine = Engine(run, torch.device("cpu"), models={"m": model}, optimizers={"main": torch.optim.SGD(model.parameters(), 0.1)},
                    seed=5, total=3, unit="epoch", first=1)
    draws = []
    engine.run_loop(lambda i: draws.append((i, torch.rand(1).item())), progress=False)
    expected = []
    for epoch in (1, 2, 3):
        torch.manual_seed(iteration_seed(5, epoch))
        expected.append((epoch, torch.rand(1).item()))
    assert draws == expected


def test_plateau_lowers_the_lr_and_stops_early(tmp_path):
    run = RunFolder.create(tmp_path / "run", {}, kind="test")
    model = torch.nn.Linear(1, 1)
    engine = Engine(run, torch.device("cpu"), models={"m": model}, optimizers={"main": torch.optim.SGD(model.parameters(), 0.1)},
                    seed=0, total=50, unit="epoch", first=1, state={"lr": 1.0})
    plateau = Plateau(lr_patience=2, lr_factor=0.1, min_lr=0.05, stop_patience=5)
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.9]
    lrs = []

    def after(epoch, _):
        lrs.append(engine.state["lr"])
        plateau.update(engine, engine.keep_if_best(scores[epoch - 1], "max"))

    engine.run_loop(lambda epoch: None, after, progress=False)
    # epochs 3..7 do not improve on 0.6: lr drops after 2 and 4 bad epochs (floored at min_lr), stop after 5
    assert engine.done == 7 and engine.state["stopped"] and engine.finished
    assert lrs == [1.0, 1.0, 1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.05)]
    assert engine.state["lr"] == pytest.approx(0.05)
    assert engine.state["best"] == 0.6 and engine.state["best_at"] == 2


def test_improved_treats_nan_as_no_score():
    assert improved(1.0, math.nan, "max") and improved(1.0, math.nan, "min")
    assert not improved(math.nan, 0.5, "max") and not improved(math.nan, math.nan, "min")
    assert improved(0.4, 0.5, "min") and not improved(0.4, 0.5, "max")


def test_schedules_and_batch_orders_are_pure_functions():
    assert scheduled_lr(2.0, "constant", 7, 10) == 2.0
    assert scheduled_lr(1.0, "cosine", 0, 11) == pytest.approx(1.0)
    assert scheduled_lr(1.0, "cosine", 10, 11) == pytest.approx(0.05)
    # every item once per epoch of consecutive steps
    assert sorted(np.concatenate([step_batch(12, 4, 0, s) for s in range(3)])) == list(range(12))
    batches = epoch_batches(10, 4, seed=1, epoch=2)
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(np.concatenate(batches)) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(batches, epoch_batches(10, 4, seed=1, epoch=2)))


def test_a_last_checkpoint_from_before_the_engine_is_refused_in_one_line(tmp_path):
    from dualsynth.errors import InputError

    run = RunFolder.create(tmp_path / "run", {}, kind="test")
    model = torch.nn.Linear(2, 1)
    run.save_checkpoint("last", {"model": model.state_dict(), "optimizer": {}, "train_state": {"step": 3}})
    engine = Engine(run, torch.device("cpu"), models={"m": model},
                    optimizers={"main": torch.optim.SGD(model.parameters(), 0.1)}, seed=0, total=10)
    with pytest.raises(InputError, match="older dualsynth"):
        engine.resume()


def test_a_run_from_an_older_version_resumes_when_new_keys_hold_their_defaults(tmp_path):
    """A key added since the run started (absent from its config.yaml) is fine at its default, not otherwise."""
    from dualsynth.errors import InputError

    old = {"lr": 0.1, "model": {"width": 8}}
    RunFolder.create(tmp_path / "run", old, kind="test")
    defaults = {"lr": 1.0, "steps": None, "model": {"width": 4, "depth": 2}}
    same = {"lr": 0.1, "steps": None, "model": {"width": 8, "depth": 2}}
    RunFolder.create(tmp_path / "run", same, kind="test", resume=True, defaults=defaults)
    for changed in ({**same, "steps": 40}, {**same, "model": {"width": 8, "depth": 3}}, {**same, "lr": 0.2}):
        with pytest.raises(InputError, match="different config"):
            RunFolder.create(tmp_path / "run", changed, kind="test", resume=True, defaults=defaults)
    with pytest.raises(InputError, match="different config"):  # without defaults a new key is a difference
        RunFolder.create(tmp_path / "run", same, kind="test", resume=True)


def test_checkpoint_seconds_writes_fewer_checkpoints_with_the_same_best_and_an_exact_resume(tmp_path, monkeypatch):
    """With checkpoint_seconds, last.pt waits for the interval (here: never due within the run) and best.pt is
    held in memory until last.pt: the files at the end equal those of a run that saved every time, and a run
    stopped and resumed under the policy still ends with the straight run's weights."""
    saves: list[str] = []
    original = RunFolder.save_checkpoint

    def counting(self, name, state):
        saves.append(name)
        return original(self, name, state)

    monkeypatch.setattr(RunFolder, "save_checkpoint", counting)

    def run(path, stop_after=None, resume=False, seconds=0.0):
        run = RunFolder.create(path, {"what": "net"}, kind="test", resume=resume)
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 6))
        engine = Engine(run, torch.device("cpu"), models={"net": net},
                        optimizers={"main": torch.optim.Adam(net.parameters(), 1e-2)},
                        seed=3, total=12, unit="step", precision="fp32")
        if resume:
            engine.resume()

        def update(step):
            x = DATA[step_batch(len(DATA), 8, 3, step)]
            loss = ((net(x) - x) ** 2).mean()
            engine.optimize(loss)
            engine.accumulate({"loss": loss.item()})

        def after(step, _):
            # a noisy score, best at some step in the middle: best.pt must hold that step's weights, not the last
            engine.keep_if_best([5, 3, 4, 1, 2, 6, 7, 8, 9, 10, 11, 12][step], "min")

        engine.run_loop(update, after, checkpoint_every=1, checkpoint_seconds=seconds, stop_after=stop_after,
                        progress=False)
        return engine, net

    _, every = run(tmp_path / "every")
    assert saves.count("last") == 12 and saves.count("best") == 3
    saves.clear()
    _, timed = run(tmp_path / "timed", seconds=3600)
    assert saves == ["best", "last"]  # once, at the end: the held best first
    for name in ("last", "best"):
        a, b = (RunFolder(tmp_path / d).load_checkpoint(name) for d in ("every", "timed"))
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key])
    best = RunFolder(tmp_path / "timed").load_checkpoint("best")
    assert best["step"] == 4  # the 4th update had the lowest score, and later updates did not leak into it
    saves.clear()
    run(tmp_path / "stopped", stop_after=5, seconds=3600)
    assert saves == ["best", "last"]
    _, resumed = run(tmp_path / "stopped", resume=True, seconds=3600)
    for a, b in zip(every.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(RunFolder(tmp_path / "stopped").load_checkpoint("best")["model"]["0.weight"],
                       RunFolder(tmp_path / "every").load_checkpoint("best")["model"]["0.weight"])
