"""fsgld_fused.integrations with the real frameworks: Lightning, Hugging Face Trainer, AveragedModel.

Tiny models built here, nothing downloaded, CPU only. Each framework's tests skip when it is not
installed (`pip install -e ".[lightning,hf]"`, which .ci/setup does).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _readme import readme_snippet
from fsgld_fused import FSGLD

# Nothing may be fetched from the Hub (and no experiment tracker may start).
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_DISABLED"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).clone()


def regression_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, torch.sin(x.sum(1, keepdim=True))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def test_importing_the_package_and_module_imports_no_framework():
    code = (
        "import sys, fsgld_fused, fsgld_fused.integrations\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name, framework", [("CleanWeightsCallback", "lightning.pytorch"),
                                             ("CleanWeightsTrainerCallback", "transformers")])
def test_callbacks_pickle_by_name(name, framework):
    # ddp_spawn and multiprocessing send callbacks to other processes by pickling them.
    import pickle

    pytest.importorskip(framework, reason=f"{framework} is not installed")
    import fsgld_fused.integrations as integrations

    callback = getattr(integrations, name)()
    assert type(pickle.loads(pickle.dumps(callback))) is type(callback)


# -- EMA / SWA: torch.optim.swa_utils.AveragedModel -------------------------------------------


def test_averaged_model_pattern_averages_clean_weights():
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    x, y = regression_data(64)
    loader = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]

    def make():
        model = tiny_net()
        return model, FSGLD(model.parameters(), lr=0.05, beta=1e6, sigma=0.1, momentum=0.9, seed=3)

    model, opt = make()
    ns = {"model": model, "opt": opt, "loader": loader, "loss_fn": F.mse_loss}
    exec(readme_snippet("ema"), ns)
    ema = ns["ema"]

    # The same chain again, averaging the clean weights by hand.
    model2, opt2 = make()
    ema_fn = get_ema_multi_avg_fn(0.999)
    clean_avg = perturbed_avg = None
    for xb, yb in loader:
        opt2.zero_grad()
        F.mse_loss(model2(xb), yb).backward()
        opt2.step()
        perturbed = [p.detach().clone() for p in model2.parameters()]
        with opt2.unperturbed():
            clean = [p.detach().clone() for p in model2.parameters()]
        if clean_avg is None:
            clean_avg, perturbed_avg = clean, perturbed
        else:
            ema_fn(clean_avg, clean, 1)
            ema_fn(perturbed_avg, perturbed, 1)
    assert opt.is_perturbed  # the pattern leaves training as it was
    assert torch.equal(flat(model.parameters()), flat(model2.parameters()))
    assert torch.allclose(flat(ema.module.parameters()), flat(clean_avg), rtol=0, atol=1e-6)
    assert not torch.allclose(flat(ema.module.parameters()), flat(perturbed_avg), rtol=0, atol=1e-3)


# -- PyTorch Lightning ------------------------------------------------------------------------


def lightning_module_class():
    L = pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed")

    class Regressor(L.LightningModule):
        """Records the weights (and whether FSGLD says they are perturbed) at every evaluation,
        and the clean weights after every optimizer step."""

        def __init__(self):
            super().__init__()
            self.net = tiny_net()
            self.initial = flat(self.parameters())
            self.seen: dict[str, list] = {"val": [], "test": []}
            self.clean_after_step: dict[int, torch.Tensor] = {}

        def configure_optimizers(self):
            return FSGLD(self.parameters(), lr=0.05, beta=1e6, sigma=0.05, momentum=0.9, seed=11)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            if self.automatic_optimization:
                return loss
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            with self.trainer.optimizers[0].unperturbed():
                self.clean_after_step[self.trainer.global_step] = flat(self.parameters())

        def _record(self, stage):
            opt = self.trainer.optimizers[0] if self.trainer.optimizers else None
            perturbed = opt.is_perturbed if opt is not None else None
            self.seen[stage].append((self.trainer.global_step, flat(self.parameters()), perturbed))

        def validation_step(self, batch, batch_idx):
            self._record("val")
            x, y = batch
            self.log("val_loss", F.mse_loss(self.net(x), y))

        def test_step(self, batch, batch_idx):
            self._record("test")

    return L, Regressor


def lightning_loader(n: int = 24, batch: int = 4):
    x, y = regression_data(n)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def lightning_trainer(L, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})


@pytest.mark.parametrize("optimization", ["automatic", "manual"])
def test_lightning_validation_test_and_checkpoints_see_clean_weights_and_training_is_unchanged(tmp_path, optimization):
    L, Regressor = lightning_module_class()
    from fsgld_fused.integrations import CleanWeightsCallback
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Run(Regressor):
        def __init__(self):
            super().__init__()
            # manual: the forward runs before opt.step(), so only the callback perturbs for it
            self.automatic_optimization = optimization == "automatic"

    Regressor = Run
    # Reference: no validation, no checkpoints.
    plain = Regressor()
    lightning_trainer(L, max_epochs=2, callbacks=[CleanWeightsCallback()], limit_val_batches=0).fit(
        plain, lightning_loader())

    model = Regressor()
    full = ModelCheckpoint(dirpath=tmp_path / "full", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    weights = ModelCheckpoint(dirpath=tmp_path / "weights", every_n_train_steps=3, save_top_k=-1,
                              save_weights_only=True, filename="{step}")
    trainer = lightning_trainer(L, max_epochs=2, val_check_interval=2, enable_checkpointing=True,
                                callbacks=[CleanWeightsCallback(), full, weights])
    trainer.fit(model, lightning_loader(), lightning_loader(8))
    opt = trainer.optimizers[0]
    steps = 12
    assert opt.step_count == steps == trainer.global_step

    # Training went on exactly as without validation and checkpoints; after fit the model is clean.
    assert torch.equal(flat(model.parameters()), flat(plain.parameters()))
    assert not opt.is_perturbed
    assert torch.equal(flat(model.parameters()), model.clean_after_step[steps])
    assert not torch.equal(model.clean_after_step[steps], model.initial)

    # Validation (the sanity check at step 0 included) saw the clean weights.
    val_steps = sorted({s for s, _, _ in model.seen["val"]})
    assert val_steps == [0, 2, 4, 6, 8, 10, 12]
    for step, w, perturbed in model.seen["val"]:
        assert perturbed is False
        assert torch.equal(w, model.clean_after_step[step] if step else model.initial), f"validation at step {step}"

    # Checkpoints hold the clean weights, and an optimizer state that says so.
    saved = {int(re.search(r"step=(\d+)", p.name).group(1)): p for p in (tmp_path / "full").glob("*.ckpt")}
    assert sorted(saved) == [2, 4, 6, 8, 10, 12]
    for step, path in saved.items():
        ckpt = torch.load(path, weights_only=False)
        assert torch.equal(flat(ckpt["state_dict"].values()), model.clean_after_step[step]), f"checkpoint at {step}"
        fresh = FSGLD(Regressor().parameters(), lr=0.05, beta=1e6, sigma=0.05, momentum=0.9)
        fresh.load_state_dict(ckpt["optimizer_states"][0])
        assert not fresh.is_perturbed and fresh.step_count == step
    weight_files = list((tmp_path / "weights").glob("*.ckpt"))
    assert len(weight_files) == 4
    for path in weight_files:
        step = int(re.search(r"step=(\d+)", path.name).group(1))
        ckpt = torch.load(path, weights_only=False)
        assert "optimizer_states" not in ckpt
        assert torch.equal(flat(ckpt["state_dict"].values()), model.clean_after_step[step]), f"weights-only at {step}"

    # trainer.test after fit: clean weights.
    trainer.test(model, lightning_loader(8), verbose=False)
    assert model.seen["test"] and all(torch.equal(w, model.clean_after_step[steps]) for _, w, _ in model.seen["test"])


def test_lightning_resume_from_a_checkpoint_continues_the_same_chain(tmp_path):
    L, Regressor = lightning_module_class()
    from fsgld_fused.integrations import CleanWeightsCallback
    from lightning.pytorch.callbacks import ModelCheckpoint

    uninterrupted = Regressor()
    uninterrupted.automatic_optimization = False
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    lightning_trainer(L, max_epochs=3, callbacks=[CleanWeightsCallback(), ckpt], enable_checkpointing=True).fit(
        uninterrupted, lightning_loader(16))

    resumed = Regressor()
    resumed.automatic_optimization = False
    trainer = lightning_trainer(L, max_epochs=3, callbacks=[CleanWeightsCallback()])
    trainer.fit(resumed, lightning_loader(16), ckpt_path=tmp_path / "epoch=0.ckpt")
    assert trainer.optimizers[0].step_count == 12
    assert torch.equal(flat(resumed.parameters()), flat(uninterrupted.parameters()))


def test_lightning_weight_averaging_averages_clean_weights():
    from torch.optim.swa_utils import get_ema_multi_avg_fn

    L, Regressor = lightning_module_class()
    from fsgld_fused.integrations import CleanWeightsCallback

    callbacks = pytest.importorskip("lightning.pytorch.callbacks")
    if not hasattr(callbacks, "WeightAveraging"):
        pytest.skip("this Lightning has no WeightAveraging callback")
    model = Regressor()
    averaging = callbacks.WeightAveraging(multi_avg_fn=get_ema_multi_avg_fn(0.9))
    clean = CleanWeightsCallback(clean_after_each_batch=True)
    trainer = lightning_trainer(L, max_epochs=2, callbacks=[clean, averaging])
    trainer.fit(model, lightning_loader(16))
    assert trainer.optimizers[0].step_count == 8

    ema, expected = get_ema_multi_avg_fn(0.9), None
    for step in range(1, 9):
        clean = list(model.clean_after_step[step].clone().split(1))
        if expected is None:
            expected = clean
        else:
            ema(expected, clean, 1)
    # WeightAveraging copies its average into the module when fit ends.
    assert torch.allclose(flat(model.parameters()), torch.cat(expected), rtol=0, atol=1e-6)


def test_lightning_readme_snippet(tmp_path, monkeypatch):
    L, _ = lightning_module_class()
    monkeypatch.chdir(tmp_path)
    ns = {"net": tiny_net(), "train_loader": lightning_loader(), "val_loader": lightning_loader(8)}
    exec(readme_snippet("lightning"), ns)
    opt = ns["trainer"].optimizers[0]
    assert isinstance(opt, FSGLD) and opt.step_count > 0 and not opt.is_perturbed
    saved = torch.load(ns["checkpoint"].best_model_path, weights_only=False)
    assert torch.equal(flat(saved["state_dict"].values()), flat(ns["net"].parameters()))


# -- Hugging Face transformers Trainer --------------------------------------------------------


def hf_classes():
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("accelerate", reason="accelerate (needed by transformers.Trainer) is not installed")

    class TinyConfig(transformers.PretrainedConfig):
        model_type = "fsgld-tiny-regressor"

        def __init__(self, n_in: int = 4, n_hidden: int = 8, **kwargs):
            self.n_in, self.n_hidden = n_in, n_hidden
            super().__init__(**kwargs)

    class TinyRegressor(transformers.PreTrainedModel):
        """Records its weights at every evaluation forward."""

        config_class = TinyConfig

        def __init__(self, config):
            super().__init__(config)
            self.net = tiny_net()
            self.eval_weights: list[torch.Tensor] = []
            self.post_init()

        def _init_weights(self, module):  # keep tiny_net's seeded initialisation
            pass

        def forward(self, x, labels=None):
            if not self.training:
                self.eval_weights.append(flat(self.parameters()))
            out = self.net(x)
            return {"loss": None if labels is None else F.mse_loss(out, labels), "logits": out}

    class Recorder(transformers.TrainerCallback):
        """Clean weights after each step (taken before CleanWeightsTrainerCallback acts) and the
        weights each evaluation saw."""

        def __init__(self):
            self.clean: dict[int, torch.Tensor] = {}
            self.evaluated: list[tuple[int, list[torch.Tensor]]] = []

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
            fsgld = optimizer.optimizer if not isinstance(optimizer, FSGLD) else optimizer
            with fsgld.unperturbed():
                self.clean[state.global_step] = flat(model.parameters())

        def on_evaluate(self, args, state, control, model=None, **kwargs):
            self.evaluated.append((state.global_step, list(model.eval_weights)))
            model.eval_weights.clear()

    return transformers, TinyConfig, TinyRegressor, Recorder


def hf_dataset(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    x, y = regression_data(n, seed)
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def hf_trainer(transformers, model, output_dir, callbacks, **kwargs):
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=8,
        report_to="none", use_cpu=True, seed=0, logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, **{"eval_strategy": "no", "save_strategy": "no", **kwargs},
    )
    opt = FSGLD(model.parameters(), lr=0.05, beta=1e6, sigma=0.05, momentum=0.9, seed=5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return transformers.Trainer(model=model, args=args, train_dataset=hf_dataset(48), eval_dataset=hf_dataset(8, 1),
                                optimizers=(opt, sched), callbacks=callbacks), opt


@pytest.mark.parametrize("trainer_calls_train_eval", [True, False], ids=["optimizer-train-eval", "callback-alone"])
def test_hf_trainer_evaluate_checkpoints_and_save_model_see_clean_weights(
    tmp_path, monkeypatch, trainer_calls_train_eval
):
    transformers, TinyConfig, TinyRegressor, Recorder = hf_classes()
    from safetensors.torch import load_file

    from fsgld_fused.integrations import CleanWeightsTrainerCallback

    if not trainer_calls_train_eval:  # as with a transformers that predates optimizer.train()/eval()
        monkeypatch.delattr(FSGLD, "train", raising=False)
        monkeypatch.delattr(FSGLD, "eval", raising=False)

    plain_model = TinyRegressor(TinyConfig())
    trainer, _ = hf_trainer(transformers, plain_model, tmp_path / "plain", [Recorder(), CleanWeightsTrainerCallback()])
    trainer.train()

    model, recorder = TinyRegressor(TinyConfig()), Recorder()
    trainer, opt = hf_trainer(transformers, model, tmp_path / "run", [recorder, CleanWeightsTrainerCallback()],
                              eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=3)
    initial = flat(model.parameters())
    trainer.train()
    assert opt.step_count == 6 and not opt.is_perturbed
    assert not torch.equal(flat(model.parameters()), initial)
    # Training went on exactly as without evaluation and checkpoints.
    assert torch.equal(flat(model.parameters()), flat(plain_model.parameters()))

    assert [s for s, _ in recorder.evaluated] == [2, 4, 6]
    for step, seen in recorder.evaluated:
        assert seen and all(torch.equal(w, recorder.clean[step]) for w in seen), f"evaluation at step {step}"

    names = [n for n, _ in model.named_parameters()]
    for step in (3, 6):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        tensors = load_file(ckpt / "model.safetensors")
        assert torch.equal(flat(tensors[n] for n in names), recorder.clean[step]), f"checkpoint-{step}"
        fresh = FSGLD(TinyRegressor(TinyConfig()).parameters(), lr=0.05, beta=1e6, sigma=0.05, momentum=0.9)
        fresh.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=False))
        assert not fresh.is_perturbed and fresh.step_count == step

    trainer.evaluate()
    assert all(torch.equal(w, recorder.clean[6]) for w in recorder.evaluated[-1][1])
    trainer.save_model(tmp_path / "final")
    tensors = load_file(tmp_path / "final" / "model.safetensors")
    assert torch.equal(flat(tensors[n] for n in names), recorder.clean[6])


def test_hf_trainer_evaluates_clean_weights_through_optimizer_train_eval_alone(tmp_path):
    # Without the callback the Trainer still calls FSGLD.eval() before evaluating and
    # FSGLD.train() before each training forward.
    transformers, TinyConfig, TinyRegressor, Recorder = hf_classes()
    model, recorder = TinyRegressor(TinyConfig()), Recorder()
    trainer, opt = hf_trainer(transformers, model, tmp_path, [recorder], eval_strategy="steps", eval_steps=3)
    trainer.train()
    assert opt.step_count == 6
    assert [s for s, _ in recorder.evaluated] == [3, 6]
    for step, seen in recorder.evaluated:
        assert seen and all(torch.equal(w, recorder.clean[step]) for w in seen), f"evaluation at step {step}"


def test_hf_readme_snippet(tmp_path, monkeypatch):
    transformers, TinyConfig, TinyRegressor, _ = hf_classes()
    monkeypatch.chdir(tmp_path)
    model = TinyRegressor(TinyConfig())
    ns = {"model": model, "train_set": hf_dataset(32), "eval_set": hf_dataset(8, 1)}
    exec(readme_snippet("hf"), ns)
    opt = ns["opt"]
    assert opt.step_count > 0 and not opt.is_perturbed
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(flat(tensors[n] for n, _ in model.named_parameters()), flat(model.parameters()))


def test_hf_trainer_builds_fsgld_from_optimizer_cls_and_kwargs(tmp_path, monkeypatch):
    transformers, TinyConfig, TinyRegressor, _ = hf_classes()
    monkeypatch.chdir(tmp_path)
    ns = {"model": TinyRegressor(TinyConfig()), "train_set": hf_dataset(32)}
    exec(readme_snippet("hf-cls"), ns)
    opt = ns["trainer"].optimizer
    while hasattr(opt, "optimizer"):  # accelerate's wrapper
        opt = opt.optimizer
    assert isinstance(opt, FSGLD) and opt.step_count > 0 and not opt.is_perturbed
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0}  # the Trainer's two groups
    # without lr in the kwargs the Trainer's groups carry none: FSGLD says so
    cls_kwargs = (FSGLD, {"beta": 1e8})
    trainer = transformers.Trainer(model=ns["model"], args=ns["args"], train_dataset=ns["train_set"],
                                   optimizer_cls_and_kwargs=cls_kwargs)
    with pytest.raises((TypeError, ValueError), match="lr"):
        trainer.train()


def test_hf_trainer_resume_from_checkpoint_continues_the_same_chain(tmp_path):
    transformers, TinyConfig, TinyRegressor, _ = hf_classes()
    from fsgld_fused.integrations import CleanWeightsTrainerCallback
    uninterrupted = TinyRegressor(TinyConfig())
    trainer, _ = hf_trainer(transformers, uninterrupted, tmp_path, [CleanWeightsTrainerCallback()],
                            save_strategy="steps", save_steps=3)
    trainer.train()

    resumed = TinyRegressor(TinyConfig())
    trainer, opt = hf_trainer(transformers, resumed, tmp_path, [CleanWeightsTrainerCallback()])
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert opt.step_count == 6
    assert torch.equal(flat(resumed.parameters()), flat(uninterrupted.parameters()))


def test_hf_trainer_load_best_model_at_end_loads_clean_weights_consistently(tmp_path):
    transformers, TinyConfig, TinyRegressor, Recorder = hf_classes()
    from fsgld_fused.integrations import CleanWeightsTrainerCallback
    model, recorder = TinyRegressor(TinyConfig()), Recorder()
    trainer, opt = hf_trainer(transformers, model, tmp_path, [recorder, CleanWeightsTrainerCallback()],
                              eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                              load_best_model_at_end=True, metric_for_best_model="eval_loss",
                              greater_is_better=True)  # "best" = highest loss: an early checkpoint
    trainer.train()
    best = int(Path(trainer.state.best_model_checkpoint).name.split("-")[1])
    assert best != 6  # an earlier checkpoint was loaded
    assert not opt.is_perturbed  # the loaded weights are clean, and the optimizer says so
    assert torch.equal(flat(model.parameters()), recorder.clean[best])
