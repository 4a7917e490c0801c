"""Clean weights where training frameworks evaluate and save.

Between steps FSGLD leaves the weights perturbed (theta + sigma*eps, for the next forward), so a
trainer that evaluates or saves between steps would see perturbed weights. The callbacks here make
the frameworks see the clean weights theta and put the same perturbation back before the next
training forward (restore and perturb are exact inverses, so training goes on unchanged):

- `CleanWeightsCallback`: a PyTorch Lightning `Callback` (``pip install fsgld-fused[lightning]``).
- `CleanWeightsTrainerCallback`: a Hugging Face `transformers.TrainerCallback`
  (``pip install fsgld-fused[hf]``).

Averaged models (`torch.optim.swa_utils.AveragedModel`, EMA/SWA) need no helper: call
``averaged.update_parameters(model)`` inside ``with opt.unperturbed():``.

Each class is built on first access, so importing this module imports neither framework.
"""

from __future__ import annotations

from typing import Any, Iterable

from .optimizer import FSGLD

__all__ = ["CleanWeightsCallback", "CleanWeightsTrainerCallback"]


def _fsgld_optimizers(optimizers: Iterable[Any]) -> list[FSGLD]:
    """The FSGLD optimizers among `optimizers`, looked for through wrappers (accelerate's
    AcceleratedOptimizer, Lightning's LightningOptimizer)."""
    found = []
    for opt in optimizers:
        for _ in range(4):  # wrappers nest a few levels at most
            if isinstance(opt, FSGLD) or opt is None:
                break
            opt = getattr(opt, "optimizer", None) or getattr(opt, "_optimizer", None)
        if isinstance(opt, FSGLD):
            found.append(opt)
    return found


def _restore(optimizers: Iterable[FSGLD]) -> None:
    for opt in optimizers:
        opt.restore()


def _perturb(optimizers: Iterable[FSGLD]) -> None:
    for opt in optimizers:
        opt.perturb()


def _lightning_callback_class() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError(
                "CleanWeightsCallback needs PyTorch Lightning: pip install 'fsgld-fused[lightning]'"
            ) from e

    class CleanWeightsCallback(Callback):
        """Lightning sees FSGLD's clean weights wherever it evaluates or saves.

        Validation (sanity check included), test and predict run on the clean weights; so does
        every state_dict taken from the LightningModule during `fit` (ModelCheckpoint, full or
        weights-only, and `trainer.save_checkpoint`), together with an optimizer state that
        records them as clean. The perturbation goes back on at the start of the next training
        batch, so training continues exactly as without evaluation or checkpoints; after `fit`
        the model is left clean. Every training batch starts perturbed, the first included, as
        with `step(closure)` (which Lightning's automatic optimization calls).

        A checkpoint resumed with `fit(ckpt_path=...)` continues the same chain: its weights and
        optimizer state are clean, and the first batch perturbs them again.

        Args:
            clean_after_each_batch: also restore the weights after every training batch (the next
                batch perturbs them again), for callbacks that read them after the optimizer step,
                such as `WeightAveraging` (EMA) and `StochasticWeightAveraging`: list this callback
                before them. Costs one restore and one perturb per batch. Without it the weights
                are clean at every epoch end, so epoch-end averaging sees clean weights anyway.

        Taking the LightningModule's state_dict between a training forward and its backward
        would restore weights that autograd saved; backward then raises (it is not silent).
        """

        def __init__(self, clean_after_each_batch: bool = False) -> None:
            super().__init__()
            self.clean_after_each_batch = clean_after_each_batch
            self._state_dict_hook = None

        def on_fit_start(self, trainer, pl_module) -> None:
            # Every state_dict of the module taken during fit (checkpoints) is of clean weights.
            def restore_before_state_dict(module, prefix, keep_vars) -> None:
                _restore(_fsgld_optimizers(trainer.optimizers))

            self._remove_hook()
            self._state_dict_hook = pl_module.register_state_dict_pre_hook(restore_before_state_dict)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            _perturb(_fsgld_optimizers(trainer.optimizers))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.clean_after_each_batch:
                _restore(_fsgld_optimizers(trainer.optimizers))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            # Clean before epoch-end readers, and before on_train_end, where averaging callbacks
            # copy their average into the module (a restore after that would shift the average).
            _restore(_fsgld_optimizers(trainer.optimizers))

        def on_train_end(self, trainer, pl_module) -> None:
            _restore(_fsgld_optimizers(trainer.optimizers))

        def on_validation_start(self, trainer, pl_module) -> None:
            _restore(_fsgld_optimizers(trainer.optimizers))

        def on_test_start(self, trainer, pl_module) -> None:
            _restore(_fsgld_optimizers(trainer.optimizers))

        def on_predict_start(self, trainer, pl_module) -> None:
            _restore(_fsgld_optimizers(trainer.optimizers))

        def on_exception(self, trainer, pl_module, exception) -> None:
            # The model left in memory after a failed or interrupted fit is the clean one.
            _restore(_fsgld_optimizers(trainer.optimizers))
            self._remove_hook()

        def on_fit_end(self, trainer, pl_module) -> None:
            self._remove_hook()

        def _remove_hook(self) -> None:
            if self._state_dict_hook is not None:
                self._state_dict_hook.remove()
                self._state_dict_hook = None

    # Picklable by name (ddp_spawn and multiprocessing send callbacks to other processes).
    CleanWeightsCallback.__module__ = __name__
    CleanWeightsCallback.__qualname__ = CleanWeightsCallback.__name__
    return CleanWeightsCallback


def _transformers_callback_class() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError as e:
        raise ImportError(
            "CleanWeightsTrainerCallback needs transformers: pip install 'fsgld-fused[hf]'"
        ) from e

    class CleanWeightsTrainerCallback(TrainerCallback):
        """The Hugging Face `Trainer` sees FSGLD's clean weights wherever it evaluates or saves.

        Pass FSGLD as ``optimizers=(FSGLD(...), scheduler)`` and this callback in ``callbacks``.
        After an optimizer step that the Trainer follows with an evaluation, a checkpoint or the
        end of training, the weights are restored (clean); the next step perturbs them again
        before its forward, so training continues exactly as without evaluation or checkpoints.
        After `train()` the model is left clean, for `evaluate()`, `predict()` and
        `save_model()`, and for `load_best_model_at_end` (whose clean checkpoint then matches).

        Checkpoints hold the clean weights with an optimizer state that records them as clean;
        `train(resume_from_checkpoint=...)` continues the same chain.
        """

        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            _perturb(_fsgld_optimizers([optimizer]))

        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            # The Trainer evaluates and saves right after on_step_end, as control says.
            if control.should_evaluate or control.should_save or control.should_training_stop:
                _restore(_fsgld_optimizers([optimizer]))

        def on_epoch_end(self, args, state, control, optimizer=None, **kwargs):
            # Training ends through here too (should_training_stop), so train() leaves clean weights.
            if control.should_evaluate or control.should_save or control.should_training_stop:
                _restore(_fsgld_optimizers([optimizer]))

    # Picklable by name (ddp_spawn and multiprocessing send callbacks to other processes).
    CleanWeightsTrainerCallback.__module__ = __name__
    CleanWeightsTrainerCallback.__qualname__ = CleanWeightsTrainerCallback.__name__
    return CleanWeightsTrainerCallback


_BUILDERS = {
    "CleanWeightsCallback": _lightning_callback_class,
    "CleanWeightsTrainerCallback": _transformers_callback_class,
}


def __getattr__(name: str) -> type:
    # Built on first access: importing fsgld_fused.integrations imports no framework.
    if name in _BUILDERS:
        cls = _BUILDERS[name]()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
