"""ChannelDropBack in loops we did not write: plain torch, accelerate, timm-style, DDP- and compile-wrapped.

Each test is shaped like a public training script (transformers' examples, accelerate's examples, timm's
train.py, a hand-written loop): resume with nothing CDB-specific, the bare model's names whatever wraps it,
optimizers that wrap another one, and a loop whose optimizer steps without CDB's hooks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from cdb_hf import ChannelDropBack, ChannelDropBackConfig

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CONFIG = dict(layer_selection="bernoulli", layer_rate=0.6, channel_rate=0.5, seed=5)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def batch(step: int, rank: int = 0) -> torch.Tensor:
    return torch.randn(8, 6, generator=torch.Generator().manual_seed(1000 * rank + step))


def train_steps(model, optimizer, cdb, steps, rank: int = 0) -> list[dict[str, list[bool]]]:
    """The README's loop (backward, step, zero_grad); the selection of every step, as lists."""
    seen = []
    for step in steps:
        model(batch(step, rank)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        seen.append({name: mask.tolist() for name, mask in cdb.last_selection.items()})
    return seen


def weights(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def run_python(code: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


# ---------------------------------------------------------------------------- resume with no CDB line
def resume_in_this_process(checkpoint: str, out: str) -> None:
    """A fresh process's resumed run, both orders: CDB attached after and before ``load_state_dict``."""
    results = {}
    for order in ("attach_after_load", "attach_before_load"):
        model = mlp()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        cdb = ChannelDropBack(model, ChannelDropBackConfig(mode="exact", **CONFIG))
        if order == "attach_before_load":
            cdb.attach(optimizer)
        optimizer.load_state_dict(state["optimizer"])
        if order == "attach_after_load":
            cdb.attach(optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a resume that works says nothing
            selections = train_steps(model, optimizer, cdb, range(3, 6))
        results[order] = {"selections": selections, "step": cdb.step}
        torch.save(weights(model), f"{out}.{order}.pt")
    Path(out).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def fresh_process(tmp_path_factory) -> dict:
    """One fresh Python process (start-up is the cost here) runs both scenarios that need one: the plain loop
    resumed from a step-3 checkpoint, and the one-process DDP wrap. The uninterrupted plain run is made here."""
    tmp_path = tmp_path_factory.mktemp("fresh_process")
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    cdb = ChannelDropBack(model, ChannelDropBackConfig(mode="exact", **CONFIG))
    cdb.attach(optimizer)
    train_steps(model, optimizer, cdb, range(3))
    checkpoint = tmp_path / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, checkpoint)
    expected = train_steps(model, optimizer, cdb, range(3, 6))
    resumed, ddp = tmp_path / "resumed.json", tmp_path / "ddp.json"
    run_python(f"import test_own_loop as t; t.resume_in_this_process({str(checkpoint)!r}, {str(resumed)!r}); "
               f"t.ddp_one_process({str(ddp)!r})")
    return {"checkpoint": checkpoint, "expected": expected, "final": weights(model), "resumed": resumed,
            "ddp": ddp}


def test_a_plain_torch_loop_resumes_the_selections_from_the_optimizer_alone(fresh_process):
    """Save model + optimizer at step 3; a fresh process restores them, attaches a fresh CDB, and steps
    4-6 draw the uninterrupted run's selections and end with its weights, bitwise."""
    checkpoint, expected, final = fresh_process["checkpoint"], fresh_process["expected"], fresh_process["final"]
    assert torch.load(checkpoint, weights_only=True)["optimizer"]["param_groups"][0]["cdb_step"] == 3
    assert any(expected), "the run selects rows"
    out = fresh_process["resumed"]
    resumed = json.loads(out.read_text())
    assert sorted(resumed) == ["attach_after_load", "attach_before_load"]
    for order, result in resumed.items():
        assert result["selections"] == expected, order
        assert result["step"] == 6
        theirs = torch.load(f"{out}.{order}.pt", weights_only=True)
        assert all(torch.equal(final[name], theirs[name]) for name in final), order


def test_a_restored_optimizer_that_disagrees_with_cdb_or_lost_its_step_is_said_loudly():
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    cdb = ChannelDropBack(model, ChannelDropBackConfig(**CONFIG))
    cdb.attach(optimizer)
    train_steps(model, optimizer, cdb, range(3))
    saved = optimizer.state_dict()

    cdb.load_state_dict({"step": 5, "seed": CONFIG["seed"]})  # CDB restored from elsewhere ...
    optimizer.load_state_dict(saved)  # ... and the optimizer from step 3
    assert cdb.step == 3, "the value restored with the optimizer is what the next step uses"
    with pytest.warns(UserWarning, match="restored optimizer carries ChannelDropBack step 3 but CDB's own step is 5"):
        train_steps(model, optimizer, cdb, [3])
    assert cdb.step == 4

    plain = torch.optim.SGD(mlp().parameters(), lr=0.1).state_dict()  # a checkpoint written without CDB
    optimizer.load_state_dict(plain)
    with pytest.warns(UserWarning, match="no longer carry ChannelDropBack's step"):
        train_steps(model, optimizer, cdb, [4])
    assert cdb.step == 5


def accelerate_run(project: Path, steps: range, save_at: int | None = None, load: Path | None = None):
    """An accelerate ``no_trainer``-style loop: prepare, build CDB on the unwrapped model, attach to the
    prepared optimizer, ``save_state``/``load_state`` and nothing else."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    cdb = ChannelDropBack(accelerator.unwrap_model(model), ChannelDropBackConfig(mode="exact", **CONFIG))
    cdb.attach(optimizer)
    if load is not None:
        accelerator.load_state(str(load))
    seen = []
    for step in steps:
        seen += train_steps(model, optimizer, cdb, [step])
        if step + 1 == save_at:
            accelerator.save_state(str(project / "checkpoint"))
    return seen, weights(accelerator.unwrap_model(model)), cdb


def test_an_accelerate_loop_resumes_the_selections_through_save_state_alone(tmp_path):
    uninterrupted, final, _ = accelerate_run(tmp_path, range(6), save_at=3)
    resumed, resumed_final, cdb = accelerate_run(tmp_path, range(3, 6), load=tmp_path / "checkpoint")
    assert resumed == uninterrupted[3:] and any(resumed)
    assert cdb.step == 6
    assert all(torch.equal(final[name], resumed_final[name]) for name in final)


# ---------------------------------------------------------------------------- names under wrappers
def ddp_one_process(out: str) -> None:
    """A real DDP wrap on a one-process gloo group: CDB built on the wrapped model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        model = mlp()
        wrapped = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9)
        cdb = ChannelDropBack(wrapped, ChannelDropBackConfig(include=["2.*", "4.weight"], **CONFIG))
        cdb.attach(optimizer)
        result = {"layers": list(cdb.layers), "selections": train_steps(wrapped, optimizer, cdb, range(4))}
        # FSDP1 (nested, use_orig_params) puts _fsdp_wrapped_module. inside every name
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        nested = mlp()
        nested[2] = FSDP(nested[2], device_id=torch.device("cpu"), use_orig_params=True)
        sharded = FSDP(nested, device_id=torch.device("cpu"), use_orig_params=True)
        result["fsdp1_names"] = [name for name, _ in sharded.named_parameters()]
        result["fsdp1_layers"] = list(ChannelDropBack(sharded, ChannelDropBackConfig(include=["2.*", "4.weight"])).layers)
    finally:
        dist.destroy_process_group()
    torch.save(weights(model), out + ".pt")
    Path(out).write_text(json.dumps(result))


def test_ddp_and_fsdp1_wrapped_models_keep_the_bare_names_patterns_and_selections(fresh_process):
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    cdb = ChannelDropBack(model, ChannelDropBackConfig(include=["2.*", "4.weight"], **CONFIG))
    cdb.attach(optimizer)
    expected = train_steps(model, optimizer, cdb, range(4))

    out = fresh_process["ddp"]
    result = json.loads(out.read_text())
    assert result["layers"] == ["2.weight", "4.weight"]
    assert result["selections"] == expected and any(expected)
    assert "_fsdp_wrapped_module.2._fsdp_wrapped_module.weight" in result["fsdp1_names"]
    assert result["fsdp1_layers"] == ["2.weight", "4.weight"]
    theirs = torch.load(f"{out}.pt", weights_only=True)
    assert all(torch.equal(value, theirs[name]) for name, value in weights(model).items())


def test_a_compiled_model_keeps_the_bare_names_and_trains_the_same():
    model = mlp()
    compiled = torch.compile(model, backend="eager")  # a real OptimizedModule; eager keeps the test fast
    assert any(name.startswith("_orig_mod.") for name, _ in compiled.named_parameters())
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=0.05)
    cdb = ChannelDropBack(compiled, ChannelDropBackConfig(mode="exact", include=["2.*", "4.*"], **CONFIG))
    assert list(cdb.layers) == ["2.weight", "4.weight"]
    cdb.attach(optimizer)
    seen = train_steps(compiled, optimizer, cdb, range(3))

    bare = mlp()
    bare_optimizer = torch.optim.AdamW(bare.parameters(), lr=0.05)
    bare_cdb = ChannelDropBack(bare, ChannelDropBackConfig(mode="exact", include=["2.*", "4.*"], **CONFIG))
    bare_cdb.attach(bare_optimizer)
    assert train_steps(bare, bare_optimizer, bare_cdb, range(3)) == seen and any(seen)
    assert all(torch.equal(value, weights(model)[name]) for name, value in weights(bare).items())


def test_wrappers_inside_the_model_do_not_change_the_names():
    """Activation checkpointing and FSDP1 put their segments inside the names; compile can wrap a submodule."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model = mlp()
    model[2] = checkpoint_wrapper(model[2])
    model[4] = torch.compile(model[4], backend="eager")
    names = [name for name, _ in model.named_parameters()]
    assert "2._checkpoint_wrapped_module.weight" in names and "4._orig_mod.weight" in names
    cdb = ChannelDropBack(nn.DataParallel(model), ChannelDropBackConfig(include=["2.weight", "4.weight"]))
    assert list(cdb.layers) == ["2.weight", "4.weight"]


def two_rank_worker(out: str) -> None:
    """One rank of an accelerate loop on a DDP-wrapped model (``torchrun --nproc_per_node 2``)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    # Built on the prepared (wrapped) model, with a pattern written for the bare one.
    cdb = ChannelDropBack(model, ChannelDropBackConfig(mode="exact", include=["2.*", "4.weight"], **CONFIG))
    cdb.attach(optimizer)
    rank = accelerator.process_index
    record = {"layers": list(cdb.layers),
              "selections": train_steps(model, optimizer, cdb, range(4), rank=rank),
              "weights": {n: v.flatten().tolist() for n, v in weights(accelerator.unwrap_model(model)).items()}}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


def test_two_gloo_ranks_with_a_ddp_wrapped_model_select_what_one_process_selects(tmp_path):
    out = str(tmp_path / "worker")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), "--no-python", sys.executable, "-c",
               f"import test_own_loop as t; t.two_rank_worker({out!r})"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    written = [Path(f"{out}.rank{rank}.json") for rank in range(2)]
    # torch's gloo sometimes aborts a rank at exit, after it wrote its record: judge by the records then.
    exit_abort = "terminate called without an active exception" in done.stderr
    assert done.returncode == 0 or (exit_abort and all(p.is_file() for p in written)), done.stderr[-4000:]
    ranks = [json.loads(p.read_text()) for p in written]

    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    cdb = ChannelDropBack(model, ChannelDropBackConfig(mode="exact", include=["2.*", "4.weight"], **CONFIG))
    cdb.attach(optimizer)
    expected = train_steps(model, optimizer, cdb, range(4))
    for record in ranks:
        assert record["layers"] == ["2.weight", "4.weight"]
        assert record["selections"] == expected and any(expected)
    assert ranks[0]["weights"] == ranks[1]["weights"], "DDP keeps the ranks' weights identical"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------- optimizers that wrap another
def per_element_state(optimizer, model) -> dict[tuple[int, str, str], torch.Tensor]:
    """Every weight-shaped state tensor of the wrapper and of the optimizer it wraps, by (level, param, key)."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for level, holder in enumerate((optimizer, optimizer._base_optimizer)):
        for param, state in holder.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    found[(level, names[id(param)], key)] = value.detach().clone()
    return found


@pytest.mark.parametrize("name", ["lookahead_adamw", "lookahead_sgd"])
def test_timm_lookahead_exact_mode_freezes_every_dropped_row_and_state_at_every_step(name):
    """timm train.py's optimizer factory; 13 steps cross Lookahead's sync (every 6 steps) twice: the first
    creates the slow weights, the second moves the fast ones towards them."""
    from timm.optim import create_optimizer_v2

    model = mlp()
    optimizer = create_optimizer_v2(model, name, lr=0.05, weight_decay=0.1, momentum=0.9)
    assert type(optimizer).__name__ == "Lookahead"
    cdb = ChannelDropBack(model, ChannelDropBackConfig(mode="exact", layer_selection="bernoulli", layer_rate=0.7,
                                                       channel_rate=0.5))
    cdb.attach(optimizer)
    params = dict(model.named_parameters())
    checked = synced = 0
    for step in range(13):
        before_weights, before_state = weights(model), per_element_state(optimizer, model)
        model(batch(step)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        assert cdb.step == step + 1, "every step is CDB's, the first included"
        after_state = per_element_state(optimizer, model)
        synced += (step + 1) % 6 == 0
        for layer, keep in cdb.last_selection.items():
            dropped = (~keep).nonzero().flatten()
            if not len(dropped):
                continue
            checked += 1
            assert torch.equal(params[layer].detach()[dropped], before_weights[layer][dropped]), (step, layer)
            assert not torch.equal(params[layer].detach()[keep], before_weights[layer][keep]), "kept rows move"
            keys = {key for (level, param, key) in after_state if param == layer}
            assert keys, "the step created state"
            for (level, param, key), value in after_state.items():
                if param != layer:
                    continue
                if (level, param, key) in before_state:
                    expected = before_state[(level, param, key)][dropped]
                elif key == "lookahead_slow_buff":  # born at the sync as a copy of the weight
                    expected = before_weights[layer][dropped]
                else:
                    expected = torch.zeros_like(value[dropped])
                assert torch.equal(value[dropped], expected), (step, layer, level, key)
    assert synced == 2 and checked >= 10
    assert any(key == "lookahead_slow_buff" for (_, _, key) in per_element_state(optimizer, model))


@pytest.mark.parametrize("name", ["lookahead_adamw", "lookahead_sgd"])
def test_timm_lookahead_grad_mode_masks_the_first_step(name):
    from timm.optim import create_optimizer_v2

    model = mlp()
    optimizer = create_optimizer_v2(model, name, lr=0.05, weight_decay=0.0, momentum=0.9)
    cdb = ChannelDropBack(model, ChannelDropBackConfig(layer_selection="bernoulli", layer_rate=1.0, channel_rate=0.5))
    cdb.attach(optimizer)
    before = weights(model)
    model(batch(0)).pow(2).mean().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        optimizer.step()
    assert cdb.step == 1
    for layer, keep in cdb.last_selection.items():
        dropped = (~keep).nonzero().flatten()
        # zero gradient, no weight decay, fresh moments: a masked first step leaves the dropped rows alone
        assert torch.equal(dict(model.named_parameters())[layer].detach()[dropped], before[layer][dropped])


def test_a_wrapper_exposing_no_torch_optimizer_is_refused_at_attach():
    class Wrapped:
        def __init__(self, params):
            self.base_optimizer = "sgd"  # e.g. an optimizer of another framework
            self.param_groups = [{"params": list(params)}]

    cdb = ChannelDropBack(mlp())
    with pytest.raises(TypeError, match=r"Wrapped.base_optimizer is a str, not a torch.optim.Optimizer"):
        cdb.attach(Wrapped(mlp().parameters()))


def test_a_wrapper_that_never_steps_its_inner_optimizer_is_named_and_not_counted():
    class Frozen(torch.optim.Optimizer):
        def __init__(self, base):
            self.base_optimizer, self.param_groups, self.state, self.defaults = base, base.param_groups, {}, {}

        def step(self, closure=None):
            return None

    model = mlp()
    optimizer = Frozen(torch.optim.SGD(model.parameters(), lr=0.1))
    cdb = ChannelDropBack(model)
    cdb.attach(optimizer)
    model(batch(0)).pow(2).mean().backward()
    with pytest.warns(UserWarning, match="Frozen.step\\(\\) returned without running SGD.step\\(\\)"):
        optimizer.step()
    assert cdb.step == 0


def test_a_wrapper_hiding_its_inner_optimizer_is_refused_at_attach():
    class Hidden(torch.optim.Optimizer):
        def __init__(self, base):
            self._opt, self.param_groups, self.state, self.defaults = base, base.param_groups, {}, {}

    model = mlp()
    with pytest.raises(TypeError, match=r"Hidden wraps an optimizer under \._opt, where ChannelDropBack does not"):
        ChannelDropBack(model).attach(Hidden(torch.optim.SGD(model.parameters(), lr=0.1)))


@pytest.mark.parametrize("scheduler_first", [True, False])
def test_torch_lr_schedulers_and_the_framed_wrapper_step_get_along(scheduler_first):
    """torch's LR schedulers wrap optimizer.step too: before or after attach, both keep working, silently."""
    from timm.optim import create_optimizer_v2

    model = mlp()
    optimizer = create_optimizer_v2(model, "lookahead_sgd", lr=0.1, momentum=0.9)
    cdb = ChannelDropBack(model, ChannelDropBackConfig(mode="exact", **CONFIG))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5) if scheduler_first else None
    handle = cdb.attach(optimizer)
    scheduler = scheduler or torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            train_steps(model, optimizer, cdb, [step])
            scheduler.step()
    assert cdb.step == 3 and optimizer.param_groups[0]["lr"] == 0.1 / 8
    handle.remove()
    train_steps(model, optimizer, cdb, [3])
    assert cdb.step == 3, "removed: the optimizer steps without CDB"


# ---------------------------------------------------------------------------- hooks that never run
def test_an_optimizer_stepping_cdb_layers_without_its_hooks_warns_once():
    model = mlp()
    cdb = ChannelDropBack(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = cdb.attach(optimizer)
    train_steps(model, optimizer, cdb, range(2))
    assert cdb.unseen_steps == 0

    replaced = torch.optim.SGD(model.parameters(), lr=0.1)  # the loop re-created its optimizer
    with pytest.warns(UserWarning, match="SGD.step\\(\\) updated ChannelDropBack's layers but CDB's hooks did not"):
        train_steps(model, replaced, cdb, [2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        train_steps(model, replaced, cdb, [3])
    assert cdb.unseen_steps == 2 and cdb.step == 2

    other = mlp()  # an unrelated model's optimizer is none of CDB's business
    train_steps(other, torch.optim.SGD(other.parameters(), lr=0.1), cdb, [0])
    assert cdb.unseen_steps == 2
    handle.remove()  # detached on purpose: no longer watched
    train_steps(model, replaced, cdb, [4])
    assert cdb.unseen_steps == 2


def test_a_cdb_that_was_never_attached_is_noticed():
    model = mlp()
    cdb = ChannelDropBack(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="attached to no optimizer"):
        train_steps(model, optimizer, cdb, [0])
    assert cdb.unseen_steps == 1


# ---------------------------------------------------------------------------- the README's "In your own loop"
def readme_block(marker: str) -> str:
    """The python block of README.md that contains ``marker``."""
    import re

    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{len(found)} README blocks contain {marker!r}"
    return found[0]


def test_readme_trainer_script_gets_the_statistics_to_tensorboard(tmp_path):
    from test_callback import RandomImages, tensorboard_tags, tiny_model, training_args
    from transformers import Trainer

    namespace = {"Trainer": Trainer, "model": tiny_model("convnext"), "train_ds": RandomImages(), "eval_ds": None,
                 "training_args": training_args(tmp_path, report_to=["tensorboard"], logging_steps=2, max_steps=4),
                 "collate_fn": None, "compute_metrics": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        exec(readme_block("add_channel_drop_back(trainer"), namespace)
    assert namespace["callback"].cdb.step == 4, "callback.cdb is the core, and it saw every optimizer step"
    assert all("cdb/applied" in entry for entry in namespace["trainer"].state.log_history if "loss" in entry)
    tags = tensorboard_tags(tmp_path)
    for stat in ("applied", "layers", "keep_fraction", "layer_rate"):
        assert any(tag.endswith(f"cdb/{stat}") for tag in tags), f"cdb/{stat} missing from {sorted(tags)}"


class LossModel(nn.Module):
    """The shape of a transformers model in a no_trainer loop: ``model(**batch).loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x, y):
        from types import SimpleNamespace

        return SimpleNamespace(loss=(self.net(x) - y).pow(2).mean())


def readme_accelerate_run(batches: list[int], output_dir: Path, resume: Path | None, monkeypatch):
    from accelerate import Accelerator

    recorded = {}
    after_step = ChannelDropBack.after_step

    def spy(cdb, optimizer=None):
        after_step(cdb, optimizer)
        recorded[cdb.step - 1] = {name: mask.tolist() for name, mask in cdb.last_selection.items()}

    monkeypatch.setattr(ChannelDropBack, "after_step", spy)
    model = LossModel()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    data = [{"x": batch(i)[0], "y": torch.full((4,), float(i))} for i in batches for _ in range(2)]
    namespace = {"accelerator": Accelerator(cpu=True), "model": model, "optimizer": optimizer,
                 "train_dataloader": torch.utils.data.DataLoader(data, batch_size=2),
                 "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0),
                 "resume_from_checkpoint": str(resume) if resume else None, "output_dir": str(output_dir),
                 "ChannelDropBack": ChannelDropBack, "ChannelDropBackConfig": ChannelDropBackConfig}
    exec(readme_block("accelerator.load_state(resume_from_checkpoint)"), namespace)
    return recorded, weights(model), namespace["cdb"]


def test_readme_accelerate_loop_resumes_bitwise(tmp_path, monkeypatch):
    uninterrupted, final, _ = readme_accelerate_run(list(range(6)), tmp_path / "a", None, monkeypatch)
    first, _, _ = readme_accelerate_run(list(range(3)), tmp_path / "b", None, monkeypatch)
    second, resumed_final, cdb = readme_accelerate_run(list(range(3, 6)), tmp_path / "c", tmp_path / "b",
                                                       monkeypatch)
    assert sorted(uninterrupted) == list(range(6)) and sorted(second) == [3, 4, 5] and cdb.step == 6
    assert {**first, **second} == uninterrupted
    assert all(torch.equal(final[name], resumed_final[name]) for name in final)


def test_readme_timm_loop_freezes_every_dropped_row_and_state_at_every_step():
    """timm train.py's shape: zero_grad, backward, step, and sync_lookahead at each epoch's end."""
    from timm.optim import create_optimizer_v2

    model = mlp()
    namespace = {"model": model, "epochs": 2, "loss_fn": lambda out, target: (out - target).pow(2).mean(),
                 "create_optimizer_v2": create_optimizer_v2, "ChannelDropBack": ChannelDropBack,
                 "ChannelDropBackConfig": ChannelDropBackConfig}
    params = dict(model.named_parameters())
    checked = []

    def loader():
        """Seven batches; after each step (when the loop asks for the next batch) check its dropped rows."""
        for step in range(7):
            before_weights = weights(model)
            before_state = per_element_state(namespace["optimizer"], model)
            yield batch(step), torch.zeros(8, 4)
            after_state = per_element_state(namespace["optimizer"], model)
            for layer, keep in namespace["cdb"].last_selection.items():
                dropped = (~keep).nonzero().flatten()
                assert torch.equal(params[layer].detach()[dropped], before_weights[layer][dropped])
                for (level, param, key), value in after_state.items():
                    if param == layer:
                        expected = before_state.get((level, param, key), before_weights[layer] if
                                                    key == "lookahead_slow_buff" else torch.zeros_like(value))
                        assert torch.equal(value[dropped], expected[dropped]), (step, layer, level, key)
                checked.append(len(dropped))

    class Loader:
        def __iter__(self):
            return loader()

    namespace["loader"] = Loader()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        exec(readme_block("create_optimizer_v2(model"), namespace)
    assert namespace["cdb"].step == 14 and sum(n > 0 for n in checked) >= 10


def test_readme_plain_loop_checkpoint_resumes_the_selections(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    core = readme_block("handle = cdb.attach(optimizer)")
    build = core.split("for _ in range(3):")[0]
    first: dict = {}
    exec(core, first)  # the core example: three steps
    capsys.readouterr()
    plain = readme_block('torch.save({"model"')
    save, restore = plain.split("# later, in a fresh process")
    restore = restore.split("\n", 1)[1]  # the rest of that comment line
    exec(save, first)
    later: dict = {}
    exec(build, later)
    exec(restore, later)
    assert capsys.readouterr().out.split() == ["3"]
    for step in range(3):
        for namespace in (first, later):
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
            namespace["model"](x).pow(2).mean().backward()
            namespace["optimizer"].step()
            namespace["optimizer"].zero_grad()
        assert {n: m.tolist() for n, m in first["cdb"].last_selection.items()} == {
            n: m.tolist() for n, m in later["cdb"].last_selection.items()}
    assert later["cdb"].step == 6
