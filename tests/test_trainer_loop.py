"""The shared training loop on a toy task (no host): loss falls, exact resume, the resume policy, cancel,
inference mode, and data-parallel ranks (gloo) matching one process."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch

from likeness import safetensors_io
from likeness.errors import InvalidInputError, NoCheckpointError, ResumeMismatchError, TrainingError
from likeness.trainers import LrGroup, TrainConfig, TrainingCancelled, TrainingTask, run_field, train
from likeness.trainers import checkpoint as ckpt
from likeness.trainers.autograd import release_inference_tensors

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


def toy_data(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    true_w = torch.randn(4, 3, generator=g)
    xs = torch.randn(n, 4, generator=g)
    return [{"x": xs[i], "y": xs[i] @ true_w} for i in range(n)]


def toy_params(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"lin.weight": torch.randn(4, 3, generator=g) * 0.1, "lin.bias": torch.zeros(3),
            "scale.gain": torch.ones(1)}


def toy_loss(batch, ctx):
    """Uses both the loop's generator (noise) and torch's global RNG (dropout), so resume must restore both."""
    p = ctx.params
    x = batch["x"] + 0.01 * ctx.randn(batch["x"].shape)
    pred = (x @ p["lin.weight"] + p["lin.bias"]) * p["scale.gain"]
    pred = torch.nn.functional.dropout(pred, p=0.1, training=True)
    return ((pred - batch["y"]) ** 2).mean()


@dataclass
class ToySettings:
    lr: float = 0.05
    noise: float = 0.01
    steps: int = run_field(20)


class ToyTask(TrainingTask):
    technique = "toy"
    label = "Toy training"

    def __init__(self, params=None, loss=toy_loss, data=None, groups=None, settings=None, frozen=()):
        self.params = toy_params() if params is None else params
        self.loss_fn = loss
        self.data = toy_data() if data is None else data
        self.groups = groups or [LrGroup(lr=0.05, prefix="lin."), LrGroup(lr=0.01, prefix="")]
        self.settings = settings or ToySettings()
        self.frozen = list(frozen)
        self.seen = []

    def trainables(self):
        return self.params

    def lr_groups(self):
        return self.groups

    def loss(self, batch, ctx):
        return self.loss_fn(batch, ctx)

    def frozen_modules(self):
        return self.frozen

    def validate(self, step):
        torch.randn(100)  # must not disturb the training RNG
        self.seen.append(step)
        return float(self.params["lin.weight"].sum())

    def finish(self, result):
        return result.params

    def write_result(self, artefact, path):
        return [safetensors_io.atomic_save(dict(artefact), path, {})]


def toy_config(tmp_path=None, **kw):
    base = dict(steps=20, batch_size=3, grad_accumulation=2, seed=7, checkpoint_every=5,
                checkpoint_path=str(tmp_path / "run.safetensors") if tmp_path is not None else None,
                progress_factory=lambda total, label: _QuietProgress(), interrupt_check=lambda: None)
    base.update(kw)
    return TrainConfig(**base)


def run_toy(tmp_path=None, task=None, **config):
    return train(task or ToyTask(), toy_config(tmp_path, **config))


class _QuietProgress:
    def __init__(self, cancel_at: int | None = None):
        self.cancel_at = cancel_at
        self.values = []

    def update_absolute(self, value, preview=None):
        self.values.append(value)
        if self.cancel_at is not None and value == self.cancel_at:
            raise TrainingCancelled("user pressed cancel")


def test_loss_falls_on_toy_problem():
    result = run_toy(steps=80)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.2 * first, (first, last)
    assert result.step == 80 and len(result.losses) == 80
    assert all(not t.requires_grad for t in result.params.values())


def test_loss_curve_image():
    curve = run_toy(steps=12).loss_curve
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and curve.dtype == torch.float32
    assert 0.0 <= float(curve.min()) and float(curve.max()) <= 1.0
    assert float(curve.std()) > 0.01  # something is drawn


def test_lr_groups_by_prefix():
    task = ToyTask(groups=[LrGroup(lr=0.0, prefix="scale."), LrGroup(lr=0.05)])
    result = run_toy(task=task, steps=3)
    assert torch.equal(result.params["scale.gain"], torch.ones(1))  # lr 0 group untouched
    assert not torch.equal(result.params["lin.weight"], toy_params()["lin.weight"])


def _assert_same_run(a, b):
    assert a.losses == b.losses
    for name in a.params:
        assert torch.equal(a.params[name], b.params[name]), name


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    full = run_toy(tmp_path / "a")

    def stop_at_12(step, loss):
        if step == 12:
            raise TrainingCancelled("stop")

    with pytest.raises(TrainingCancelled):
        run_toy(tmp_path / "b", step_callback=stop_at_12)
    assert ckpt.load_training_state(str(tmp_path / "b" / "run.safetensors")).step == 10
    resumed = run_toy(tmp_path / "b", task=ToyTask(params=toy_params(seed=99)), resume="require")
    assert resumed.start_step == 10 and resumed.step == 20
    _assert_same_run(full, resumed)


def test_resume_extends_a_finished_run(tmp_path):
    full = run_toy(tmp_path / "a", steps=20)
    run_toy(tmp_path / "b", task=ToyTask(settings=ToySettings(steps=15)), steps=15)
    extended = run_toy(tmp_path / "b", steps=20, resume="require")  # steps is a run field: not fingerprinted
    _assert_same_run(full, extended)


def _mismatched(tmp_path, resume):
    run_toy(tmp_path, steps=5)
    return run_toy(tmp_path, task=ToyTask(settings=ToySettings(lr=0.1)), steps=6, batch_size=2, resume=resume)


def test_resume_require_with_other_settings_names_the_fields(tmp_path):
    with pytest.raises(ResumeMismatchError, match="batch_size: checkpoint 3 vs now 2") as caught:
        _mismatched(tmp_path, "require")
    assert caught.value.fields == ["batch_size", "lr"]
    assert caught.value.differences["lr"] == (0.05, 0.1)
    assert isinstance(caught.value, TrainingError) and "lr: checkpoint 0.05 vs now 0.1" in str(caught.value)


def test_resume_auto_with_other_settings_starts_fresh_with_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="likeness"):
        result = _mismatched(tmp_path, "auto")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "batch_size: checkpoint 3 vs now 2" in warnings[0].getMessage()
    assert result.start_step == 0 and result.step == 6
    fresh = run_toy(tmp_path / "other", task=ToyTask(settings=ToySettings(lr=0.1)), steps=6, batch_size=2)
    _assert_same_run(fresh, result)
    assert ckpt.load_training_state(str(tmp_path / "run.safetensors")).step == 6  # replaced


def test_resume_fresh_ignores_a_matching_checkpoint(tmp_path):
    run_toy(tmp_path, steps=5)
    result = run_toy(tmp_path, steps=8, resume="fresh")
    assert result.start_step == 0 and result.step == 8
    _assert_same_run(run_toy(steps=8), result)


def test_resume_require_without_a_checkpoint_raises(tmp_path):
    with pytest.raises(NoCheckpointError, match="no training checkpoint"):
        run_toy(tmp_path, resume="require")
    assert run_toy(tmp_path, steps=3, resume="auto").start_step == 0  # auto: a new run
    with pytest.raises(InvalidInputError, match="resume must be one of"):
        run_toy(tmp_path, resume=True)


def test_a_finished_run_writes_the_tasks_result(tmp_path):
    result = run_toy(steps=3, result_path=str(tmp_path / "toy.safetensors"))
    assert result.artefact is result.params  # ToyTask.finish
    assert result.result_files == [str(tmp_path / "toy.safetensors")]
    written = safetensors_io.load_tensors(result.result_files[0])[0]
    assert all(torch.equal(written[k], v) for k, v in result.params.items())
    cancelled = run_toy(steps=3, result_path=str(tmp_path / "cancelled.safetensors"), on_cancel="return",
                        progress_factory=lambda total, label: _QuietProgress(cancel_at=2))
    assert cancelled.cancelled and cancelled.result_files == [] and not (tmp_path / "cancelled.safetensors").exists()


def test_cancel_from_progress_keeps_last_checkpoint(tmp_path):
    path = tmp_path / "run.safetensors"
    with pytest.raises(TrainingCancelled):
        run_toy(tmp_path, progress_factory=lambda total, label: _QuietProgress(cancel_at=7))
    state = ckpt.load_training_state(str(path))
    assert state.step == 5 and len(state.losses) == 5
    assert not [n for n in os.listdir(tmp_path) if n != "run.safetensors"]  # no temp files left

    result = run_toy(tmp_path / "r", on_cancel="return",
                     progress_factory=lambda total, label: _QuietProgress(cancel_at=7))
    assert result.cancelled and result.step == 7 and result.checkpoint_step == 5
    assert result.loss_curve.shape[-1] == 3


def test_crash_in_the_middle_of_a_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.safetensors"
    real_writer = safetensors_io._write_safetensors
    calls = {"n": 0}

    def torn_writer(tensors, target, metadata):
        calls["n"] += 1
        if calls["n"] == 3:  # third checkpoint (step 15): write half a file, then die
            real_writer(tensors, target, metadata)
            with open(target, "r+b") as handle:
                handle.truncate(os.path.getsize(target) // 2)
            raise OSError("disk gone mid-write")
        real_writer(tensors, target, metadata)

    monkeypatch.setattr(safetensors_io, "_write_safetensors", torn_writer)
    with pytest.raises(OSError, match="mid-write"):
        run_toy(tmp_path)
    assert ckpt.load_training_state(str(path)).step == 10
    assert os.listdir(tmp_path) == ["run.safetensors"]
    monkeypatch.setattr(safetensors_io, "_write_safetensors", real_writer)
    resumed = run_toy(tmp_path, resume="require")
    _assert_same_run(run_toy(tmp_path / "full"), resumed)


CHILD_TRAIN = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from _bootstrap import load_pack
    load_pack()
    import test_trainer_loop as t
    import pathlib

    def die_at_8(step, loss):
        if step == 8:
            os.kill(os.getpid(), signal.SIGKILL)

    t.run_toy(pathlib.Path({out!r}), step_callback=die_at_8)
""")


def test_sigkilled_training_process_resumes_exactly(tmp_path):
    script = CHILD_TRAIN.format(root=ROOT, tests=TESTS, out=str(tmp_path / "b"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert ckpt.load_training_state(str(tmp_path / "b" / "run.safetensors")).step == 5
    resumed = run_toy(tmp_path / "b", resume="require")
    _assert_same_run(run_toy(tmp_path / "a"), resumed)


def test_inference_tensors_as_inputs_params_and_frozen_modules():
    """Everything built under inference mode, training called under inference mode (as in ComfyUI)."""
    with torch.inference_mode():
        params = toy_params()
        data = toy_data()
        frozen = torch.nn.Linear(3, 3)  # a frozen layer between the trainable tensors and the loss
        torch.nn.init.eye_(frozen.weight)
        torch.nn.init.zeros_(frozen.bias)
        module = torch.nn.Linear(4, 3)  # a module whose Parameter is trained in place
    assert params["lin.weight"].is_inference() and data[0]["x"].is_inference() and frozen.weight.is_inference()
    original_param = module.weight

    def loss(batch, ctx):
        pred = frozen(batch["x"] @ ctx.params["lin.weight"] + ctx.params["lin.bias"])
        pred = pred + 0.0 * (batch["x"] @ ctx.params["module.weight"].T).sum()
        return ((pred - batch["y"]) ** 2).mean()

    all_params = {"lin.weight": params["lin.weight"], "lin.bias": params["lin.bias"], "module.weight": module.weight}
    task = ToyTask(params=all_params, loss=loss, data=data, groups=[LrGroup(lr=0.05)], frozen=[frozen])
    with torch.inference_mode():
        result = run_toy(task=task, steps=40)
    assert result.losses[-1] < 0.3 * result.losses[0]
    assert not frozen.weight.is_inference() and not frozen.weight.requires_grad  # released by the loop
    assert module.weight is original_param and not module.weight.is_inference()
    assert torch.equal(result.params["lin.weight"], params["lin.weight"])  # updated in place
    assert torch.is_inference_mode_enabled() is False


def test_undeclared_frozen_inference_weights_give_an_actionable_error():
    with torch.inference_mode():
        frozen = torch.nn.Linear(3, 3)

    def loss(batch, ctx):
        return frozen(batch["x"][:, :3] * ctx.params["g"]).pow(2).mean()

    task = ToyTask(params={"g": torch.ones(3)}, loss=loss, groups=[LrGroup(lr=0.1)])
    with torch.inference_mode(), pytest.raises(TrainingError, match="frozen_modules") as caught:
        run_toy(task=task, steps=2)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert release_inference_tensors(frozen) == 2  # the loop left the undeclared module alone


def test_validation_hook_runs_every_n_steps_without_changing_the_run():
    plain = run_toy(steps=10)
    task = ToyTask()
    hooked = run_toy(task=task, steps=10, validate_every=4, validate_at_end=True)
    assert task.seen == [4, 8, 10] and [s for s, _ in hooked.validations] == [4, 8, 10]
    _assert_same_run(plain, hooked)


def test_training_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_toy(steps=3)
    assert torch.equal(torch.rand(3), expected)


def test_diverging_loss_raises_and_keeps_checkpoint(tmp_path):
    def loss(batch, ctx):
        value = (ctx.params["lin.weight"] ** 2).sum()
        return value * (float("nan") if ctx.step >= 6 else 1.0)

    with pytest.raises(TrainingError, match="lower the learning rate"):
        run_toy(tmp_path, task=ToyTask(loss=loss))
    assert ckpt.load_training_state(str(tmp_path / "run.safetensors")).step == 5
