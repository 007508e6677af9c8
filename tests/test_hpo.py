"""Trainer.hyperparameter_search with cdb/cdb_* keys: each trial's ChannelDropBack uses that trial's values."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import transformers.trainer
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.integrations import integration_utils
from transformers.trainer_utils import HPSearchBackend

from cdb_hf import ChannelDropBackCallback, ChannelDropBackConfig, add_channel_drop_back
from cdb_hf.callback import trial_config
from cdb_hf.errors import UsageError
from cdb_hf.trainer import CDBTrainer

optuna = pytest.importorskip("optuna")

RATES = [0.25, 0.5]


class TinyNet(nn.Module):
    """Two Linear layers of 16 rows each: an exact draw of rate r keeps exactly 1 - r of either."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 16)

    def forward(self, x, labels=None):
        logits = self.fc2(torch.relu(self.fc1(x)))
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def _data(n: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, generator=generator), "labels": torch.tensor(i % 16)} for i in range(n)]


class TrialRecorder(TrainerCallback):
    """Per trial: its parameters, the config CDB was built with, and the keep fractions it logged."""

    def __init__(self, cdb_callback: ChannelDropBackCallback) -> None:
        self.cdb_callback, self.trials = cdb_callback, []

    def on_train_begin(self, args, state, control, **kwargs):
        cdb = self.cdb_callback.cdb
        self.trials.append({"params": dict(state.trial_params or {}), "config": cdb.config if cdb else None,
                            "keep": [], "learning_rate": args.learning_rate})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "cdb/keep_fraction" in logs:
            self.trials[-1]["keep"].append(logs["cdb/keep_fraction"])


def _search(tmp_path, trainer_class: str, hp_space) -> tuple[TrialRecorder, object, list[str]]:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=0.1, use_cpu=True, report_to="none", save_strategy="no",
                             eval_strategy="no", disable_tqdm=True)
    config = ChannelDropBackConfig(channel_rate=0.1, channel_sampling="exact", seed=1)
    common = {"model_init": TinyNet, "args": args, "train_dataset": _data(16), "eval_dataset": _data(8)}
    if trainer_class == "CDBTrainer":
        cdb_callback = ChannelDropBackCallback(config)
        trainer = CDBTrainer(callbacks=[cdb_callback], **common)
    else:  # any Trainer: the callback reads state.trial_params
        trainer = Trainer(**common)
        cdb_callback = add_channel_drop_back(trainer, config)
    recorder = TrialRecorder(cdb_callback)
    trainer.add_callback(recorder)
    with mock.patch.object(transformers.trainer.logger, "warning") as warning:
        best = trainer.hyperparameter_search(
            hp_space=hp_space, backend="optuna", n_trials=2, direction="minimize",
            sampler=optuna.samplers.GridSampler({"cdb_channel_rate": RATES}, seed=0))
    warnings = [str(call.args[0]) for call in warning.call_args_list if call.args]
    return recorder, best, warnings


@pytest.mark.parametrize("trainer_class", ["CDBTrainer", "Trainer"])
def test_each_trial_trains_with_its_own_cdb_channel_rate(trainer_class, tmp_path):
    def hp_space(trial):
        return {"cdb_channel_rate": trial.suggest_categorical("cdb_channel_rate", RATES),
                "learning_rate": 0.05}  # a TrainingArguments key next to it still reaches the args

    recorder, best, warnings = _search(tmp_path, trainer_class, hp_space)
    assert len(recorder.trials) == 2
    used = sorted(trial["params"]["cdb_channel_rate"] for trial in recorder.trials)
    assert used == RATES  # the grid gave the two trials different values
    for trial in recorder.trials:
        rate = trial["params"]["cdb_channel_rate"]
        assert trial["config"].channel_rate == rate
        assert (trial["config"].channel_sampling, trial["config"].seed) == ("exact", 1)  # the rest is the base's
        # What the masking did: every step dropped exactly `rate` of the selected layer's 16 rows.
        assert trial["keep"] and all(keep == pytest.approx(1 - rate) for keep in trial["keep"])
    assert best.hyperparameters["cdb_channel_rate"] in RATES
    assert [trial["learning_rate"] for trial in recorder.trials] == [0.05, 0.05]  # not the args' 0.1
    if trainer_class == "CDBTrainer":  # it keeps the cdb keys out of TrainingArguments and their warning
        assert not [w for w in warnings if "cdb_channel_rate" in w]


@pytest.mark.parametrize("backend", [HPSearchBackend.RAY, HPSearchBackend.WANDB])
def test_a_ray_or_wandb_trial_dict_configures_cdb_and_the_training_arguments(backend, tmp_path):
    """ray and wandb hand the Trainer the trial as a dict of its parameters (no hp_space call): CDBTrainer
    takes the cdb_* keys from it for CDB and leaves the rest to TrainingArguments, without a warning."""
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1,
                             learning_rate=0.1, use_cpu=True, report_to="none", save_strategy="no",
                             eval_strategy="no", disable_tqdm=True)
    cdb_callback = ChannelDropBackCallback(ChannelDropBackConfig(channel_rate=0.1, channel_sampling="exact", seed=1))
    trainer = CDBTrainer(model_init=TinyNet, args=args, train_dataset=_data(16), callbacks=[cdb_callback])
    recorder = TrialRecorder(cdb_callback)
    trainer.add_callback(recorder)
    trainer.hp_search_backend = backend  # what hyperparameter_search(backend=...) sets before each trial
    available = {HPSearchBackend.RAY: "is_ray_tune_available", HPSearchBackend.WANDB: "is_wandb_available"}[backend]
    # Neither package is installed here: transformers reads a dict trial only when one is, and names the
    # trial's folder after the backend's run id.
    with mock.patch.object(integration_utils, available, return_value=True), \
            mock.patch.object(trainer, "_get_output_dir", return_value=str(tmp_path)), \
            mock.patch.object(transformers.trainer.logger, "warning") as warning:
        trainer.train(trial={"cdb_channel_rate": 0.5, "learning_rate": 0.05})
    (trial,) = recorder.trials
    assert trial["config"].channel_rate == 0.5 and trial["learning_rate"] == 0.05
    assert trial["keep"] and all(keep == pytest.approx(0.5) for keep in trial["keep"])
    assert not [call for call in warning.call_args_list if "cdb_channel_rate" in str(call.args)]


def test_a_cdb_false_trial_trains_without_cdb(tmp_path):
    def hp_space(trial):
        rate = trial.suggest_categorical("cdb_channel_rate", RATES)
        return {"cdb_channel_rate": rate, "cdb": rate == 0.25}

    recorder, _, _ = _search(tmp_path, "CDBTrainer", hp_space)
    by_rate = {trial["params"]["cdb_channel_rate"]: trial for trial in recorder.trials}
    assert by_rate[0.25]["config"].channel_rate == 0.25 and by_rate[0.25]["keep"]
    assert by_rate[0.5]["config"] is None and not by_rate[0.5]["keep"]


def test_trial_values_are_checked_like_the_cli():
    base = ChannelDropBackConfig(channel_rate=0.3, axis="cols")
    assert trial_config(base, {"cdb_channel_rate": 0.5}) == ChannelDropBackConfig(channel_rate=0.5, axis="cols")
    assert trial_config(base, {"cdb": False}) is None
    with pytest.raises(UsageError, match=r"\['cdb_chanel_rate'\] are not ChannelDropBack settings"):
        trial_config(base, {"cdb_chanel_rate": 0.5})
    with pytest.raises(UsageError, match="channel_rate"):
        trial_config(base, {"cdb_channel_rate": 1.5})
