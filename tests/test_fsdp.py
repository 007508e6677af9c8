"""ChannelDropBack on FSDP2-sharded parameters: two gloo ranks on CPU against one unsharded process.

FSDP2 (``fully_shard``) turns parameters, gradients and optimizer state into DTensors sharded on
dim 0. Averaging the ranks' half-batch gradients equals the full-batch gradient, so a sharded run
with CDB must follow the trajectory of a plain single-process run with the same CDB config on the
full batches, up to float rounding. Starting processes is the expensive part here, so one spawn of
two ranks runs every scenario and writes what it saw to a file; the tests compare in this process.

The model has uneven shards on purpose: 5 conv rows and 7 linear rows split 3/2 and 4/3 over two
ranks, and the 1-row head leaves rank 1 an empty shard (eligible along cols only).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cdb_hf import ChannelDropBack, ChannelDropBackConfig
from cdb_hf.core import _chunk_range, _DroppedRows, _Selected

WORLD_SIZE = 2
STEPS = 4
BATCH = 8
SCENARIOS = [(axis, mode) for axis in ("rows", "cols") for mode in ("grad", "exact")]
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}  # the sharded run sums gradients in another order


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(2, 5, 3), nn.ReLU(), nn.Flatten(), nn.Linear(15, 7), nn.ReLU(), nn.Linear(7, 1))


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 2, 5, generator=generator), torch.randn(BATCH, 1, generator=generator))
            for _ in range(STEPS)]


def cdb_config(axis: str, mode: str) -> ChannelDropBackConfig:
    return ChannelDropBackConfig(layer_selection="bernoulli", layer_rate=0.7, channel_rate=0.4, axis=axis,
                                 mode=mode, seed=3)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a DTensor (a collective), else a copy."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter and its per-element optimizer state, gathered."""
    out = {}
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {})
        out[name] = {"weight": _full(param),
                     **{key: _full(value) for key, value in state.items() if key in ("exp_avg", "exp_avg_sq")}}
    return out


def train(model: nn.Module, config: ChannelDropBackConfig | None, rank: int = 0, world_size: int = 1) -> list[dict]:
    """AdamW with weight decay (and CDB through its optimizer hooks); per step: selection, before, after."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    cdb = ChannelDropBack(model, config) if config is not None else None
    if cdb is not None:
        cdb.attach(optimizer)
    records = []
    share = BATCH // world_size
    for x, y in batches():
        before = _snapshot(model, optimizer)
        part = slice(rank * share, (rank + 1) * share)
        nn.functional.mse_loss(model(x[part]), y[part]).backward()
        optimizer.step()
        optimizer.zero_grad()
        selection = {n: m.cpu() for n, m in cdb.last_selection.items()} if cdb is not None else {}
        records.append({"selection": selection, "before": before, "after": _snapshot(model, optimizer)})
    return records


# ---------------------------------------------------------------------------- the two ranks
def _refusals(mesh) -> dict[str, str]:
    """The error (or "accepted") for each DTensor layout CDB must refuse or accept."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    def outcome(model: nn.Module, **config) -> str:
        try:
            ChannelDropBack(model, ChannelDropBackConfig(**config))
        except ValueError as error:
            return str(error)
        return "accepted"

    shard_1 = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    fully_shard(shard_1[1], shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    hsdp = nn.Linear(4, 6)
    fully_shard(hsdp, mesh=init_device_mesh("cpu", (1, WORLD_SIZE), mesh_dim_names=("replicate", "shard")))
    partial = nn.Linear(4, 6)
    partial.weight = nn.Parameter(DTensor.from_local(partial.weight.detach(), mesh, [Partial()]))
    replicated = nn.Linear(4, 6)
    replicated.weight = nn.Parameter(distribute_tensor(replicated.weight.detach(), mesh, [Replicate()]))
    # A replicated weight keeps every row locally: the dropped indices apply to it as they are.
    cdb = ChannelDropBack(replicated, ChannelDropBackConfig(channel_rate=0.5, channel_sampling="exact"))
    replicated.weight.grad = distribute_tensor(torch.ones(6, 4), mesh, [Replicate()])
    cdb.before_step()
    replicated_grad_ok = torch.equal(replicated.weight.grad.to_local().sum(1) != 0, cdb.last_selection["weight"])
    return {"shard_1": outcome(shard_1), "shard_1_excluded": outcome(shard_1, exclude=["1.*"]),
            "hsdp_2d_mesh": outcome(hsdp), "partial": outcome(partial), "replicate": outcome(replicated),
            "replicate_grad_masked": str(replicated_grad_ok)}


def _rank_main(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: every scenario on an FSDP2-sharded model, then the refused layouts."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        results = {}
        for axis, mode in SCENARIOS:
            model = build_model()
            for module in model:
                if isinstance(module, (nn.Conv1d, nn.Linear)):
                    fully_shard(module)
            fully_shard(model)
            results[f"{axis}-{mode}"] = train(model, cdb_config(axis, mode), rank, world_size)
        results["refusals"] = _refusals(init_device_mesh("cpu", (world_size,)))
        # Written whole or not at all: the test judges the ranks by these files (see ``ranks``).
        torch.save(results, Path(out_dir) / f"rank{rank}.pt.tmp")
        os.replace(Path(out_dir) / f"rank{rank}.pt.tmp", Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Spawn both ranks once; return ``[rank 0's record, rank 1's record]``."""
    out_dir = tmp_path_factory.mktemp("fsdp2")
    written = [out_dir / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    try:
        mp.start_processes(_rank_main, args=(WORLD_SIZE, _free_port(), str(out_dir)), nprocs=WORLD_SIZE,
                           join=True, start_method="spawn")
    except mp.ProcessExitedException as exited:
        # torch 2.14's gloo sometimes aborts a rank at interpreter exit ("terminate called without an active
        # exception": SIGABRT), after destroy_process_group and so after the rank wrote its record. That
        # signature, with every record written, is not a failure of what is tested here; anything else is.
        if not (exited.signal_name == "SIGABRT" and all(path.is_file() for path in written)):
            raise
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


# ---------------------------------------------------------------------------- the tests
def _dropped(tensor: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.index_select(dim, (~keep).nonzero().flatten())


@pytest.mark.parametrize("axis,mode", SCENARIOS)
def test_sharded_cdb_follows_the_unsharded_reference(ranks, axis, mode):
    sharded = ranks[0][f"{axis}-{mode}"]
    reference = train(build_model(), cdb_config(axis, mode))
    without_cdb = train(build_model(), None)
    for step, (got, expected) in enumerate(zip(sharded, reference)):
        assert got["selection"].keys() == expected["selection"].keys(), step
        for name, keep in expected["selection"].items():
            assert torch.equal(got["selection"][name], keep), (step, name)
            for rank_record in ranks[1][f"{axis}-{mode}"][step]["selection"], got["selection"]:
                assert torch.equal(rank_record[name], keep), f"ranks disagree at step {step} on {name}"
        for name, tensors in expected["after"].items():
            for key, value in tensors.items():
                torch.testing.assert_close(got["after"][name][key], value, **TOLERANCE, msg=f"{step} {name} {key}")
    # Masking is real: the same sharded run is far from plain training.
    final, plain = sharded[-1]["after"], without_cdb[-1]["after"]
    assert max((final[n]["weight"] - plain[n]["weight"]).abs().max().item() for n in plain) > 1e-2


@pytest.mark.parametrize("axis", ["rows", "cols"])
def test_exact_mode_leaves_dropped_slices_and_their_state_bitwise_unchanged(ranks, axis):
    dim = 0 if axis == "rows" else 1
    checked = 0
    for record in ranks[0][f"{axis}-exact"]:
        for name, keep in record["selection"].items():
            before, after = record["before"][name], record["after"][name]
            assert torch.equal(_dropped(after["weight"], keep, dim), _dropped(before["weight"], keep, dim)), name
            for key in ("exp_avg", "exp_avg_sq"):
                # State created by this very step stays at its initial value, zero, in dropped slices.
                start = before[key] if key in before else torch.zeros_like(after[key])
                assert torch.equal(_dropped(after[key], keep, dim), _dropped(start, keep, dim)), (name, key)
            checked += int((~keep).sum())
    assert checked > 0


def test_selections_exercise_both_shards_and_the_empty_one(ranks):
    """Guards against a vacuous pass: dropped rows on both ranks' shards, and the empty shard selected."""
    rows_split = {"0.weight": 3, "3.weight": 4}  # rank 0 holds rows [0, split), rank 1 the rest
    both_sides = [name for record in ranks[0]["rows-grad"] for name, keep in record["selection"].items()
                  if not keep[:rows_split[name]].all() and not keep[rows_split[name]:].all()]
    assert both_sides
    head_cols = [keep for record in ranks[0]["cols-exact"] for name, keep in record["selection"].items()
                 if name == "5.weight"]
    assert any(not keep.all() for keep in head_cols), "the head (an empty shard on rank 1) had dropped columns"


def test_unsupported_dtensor_layouts_are_refused_by_name(ranks):
    for refusals in (r["refusals"] for r in ranks):
        assert "parameter '1.weight' is a DTensor with placements (Shard(dim=1),) on a 1-D" in refusals["shard_1"]
        assert "supports DTensors sharded Shard(0) or Replicate() on a 1-D mesh" in refusals["shard_1"]
        assert refusals["shard_1_excluded"] == "accepted"
        assert "parameter 'weight' is a DTensor with placements (Replicate(), Shard(dim=0)) on a 2-D" in \
            refusals["hsdp_2d_mesh"]
        assert "parameter 'weight' is a DTensor with placements (Partial(sum),) on a 1-D" in refusals["partial"]
        assert refusals["replicate"] == "accepted" and refusals["replicate_grad_masked"] == "True"


# ---------------------------------------------------------------------------- the shard arithmetic
@pytest.mark.parametrize("size,ranks_", [(7, 2), (5, 2), (3, 4), (4, 3), (10, 4), (1, 2)])
def test_chunk_range_is_torch_chunk(size, ranks_):
    pieces = torch.arange(size).chunk(ranks_)
    for rank in range(ranks_):
        start, length = _chunk_range(size, ranks_, rank)
        expected = pieces[rank].tolist() if rank < len(pieces) else []
        assert list(range(start, start + length)) == expected


@pytest.mark.parametrize("size,ranks_", [(7, 2), (3, 4), (4, 3)])
def test_local_masks_on_every_shard_equal_the_unsharded_selection(size, ranks_):
    """Uneven and empty shards: zero_/save/restore_ on each shard, concatenated, equal the full tensor's."""
    full = torch.randn(size, 3, generator=torch.Generator().manual_seed(0))
    dropped = torch.tensor([size - 1, 0])
    expected = full.clone()
    plain = _DroppedRows(_Selected("w", nn.Parameter(full), 0, size, dropped, 1.0, None, len(dropped)))
    plain.zero_(expected)
    zeroed, restored = [], []
    for rank in range(ranks_):
        start, length = _chunk_range(size, ranks_, rank)
        shard = full[start:start + length].clone()
        rows = _DroppedRows(_Selected("w", nn.Parameter(full), 0, size, dropped, 1.0, (start, length), len(dropped)))
        saved = rows.save(shard)
        rows.zero_(shard)
        zeroed.append(shard.clone())
        shard.add_(1.0)  # an "optimizer step" on every slice
        rows.restore_(shard, saved)
        restored.append(shard)
    assert torch.equal(torch.cat(zeroed), expected)
    moved = full + 1.0
    moved[dropped] = full[dropped]
    assert torch.equal(torch.cat(restored), moved)


# ---------------------------------------------------------------------------- one rank, in this process
@pytest.fixture
def fake_rank_1():
    """Rank 1 of a two-rank group that exists only in this process (torch's FakeProcessGroup: no peer, no spawn,
    collectives do nothing). Enough for the layout arithmetic and for element-wise steps on the local shard, and
    fast enough to run for every mutant in `make mutants` (which leaves out the two-rank tests above)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=1, world_size=WORLD_SIZE)
    try:
        yield DeviceMesh("cpu", torch.arange(WORLD_SIZE))
    finally:
        dist.destroy_process_group()


def test_local_shard_maps_rank_1_to_its_rows_and_refuses_other_layouts(fake_rank_1):
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from cdb_hf.core import _local_shard

    def sharded(rows: int, placements, mesh=fake_rank_1) -> nn.Parameter:
        return nn.Parameter(distribute_tensor(torch.randn(rows, 3), mesh, placements))

    assert _local_shard("w", sharded(5, [Shard(0)]), 0) == (3, 2), "rows 3-4 of 5"
    assert _local_shard("w", sharded(8, [Shard(0)]), 0) == (4, 4)
    assert _local_shard("w", sharded(1, [Shard(0)]), 0) == (1, 0), "an empty shard"
    assert _local_shard("w", sharded(5, [Shard(0)]), 1) is None, "cols: every column is local"
    assert _local_shard("w", sharded(5, [Replicate()]), 0) is None
    assert _local_shard("w", nn.Parameter(torch.randn(5, 3)), 0) is None
    supported = "ChannelDropBack supports DTensors sharded Shard(0) or Replicate() on a 1-D mesh"
    with pytest.raises(ValueError, match=r"parameter 's' is a DTensor with placements \(Shard\(dim=1\),\) on a "
                                         rf"1-D device mesh; {re.escape(supported)}"):
        _local_shard("s", sharded(5, [Shard(1)]), 0)
    square = DeviceMesh("cpu", torch.arange(WORLD_SIZE).view(WORLD_SIZE, 1))
    with pytest.raises(ValueError, match=r"placements \(Shard\(dim=0\), Replicate\(\)\) on a 2-D device mesh"):
        _local_shard("h", sharded(4, [Shard(0), Replicate()], square), 0)
    odd = nn.Parameter(DTensor.from_local(torch.randn(3, 4), fake_rank_1, [Shard(0)], run_check=False,
                                          shape=torch.Size([5, 4]), stride=(4, 1)))
    with pytest.raises(ValueError, match=r"^parameter 'odd': the local shard has 3 of 5 rows where DTensor's "
                                         r"Shard\(0\) rule gives 2; ChannelDropBack cannot map its selection onto "
                                         r"this layout$"):
        _local_shard("odd", odd, 0)
    outside = DeviceMesh("cpu", torch.tensor([0]))  # a mesh without this rank: it holds no rows
    assert _local_shard("w", sharded(5, [Shard(0)], outside), 0) == (5, 0)
    layer = nn.Linear(3, 5)
    layer.weight = sharded(5, [Shard(1)])
    with pytest.raises(ValueError, match=r"^parameter 'weight' is a DTensor with placements"):
        ChannelDropBack(layer)


@pytest.mark.parametrize("mode", ["grad", "exact"])
def test_one_sharded_step_on_rank_1_equals_those_rows_of_the_unsharded_step(fake_rank_1, mode):
    """A Linear whose weight is sharded Shard(0) (rows 3-4 of 5 here) and its gradient: CDB's step on the local
    shard equals rows 3-4 of the same step on the whole weight (grad and exact mode, AdamW with weight decay)."""
    from torch.distributed.tensor import DTensor, Shard

    def rank_1_rows(full: torch.Tensor) -> torch.Tensor:  # (distribute_tensor would scatter: a no-op here)
        return DTensor.from_local(full[3:].clone(), fake_rank_1, [Shard(0)], run_check=False, shape=full.shape,
                                  stride=full.stride())

    config = ChannelDropBackConfig(layer_selection="bernoulli", layer_rate=1.0, channel_rate=0.5, mode=mode, seed=5)
    generator = torch.Generator().manual_seed(0)
    weight, grads = torch.randn(5, 3, generator=generator), torch.randn(3, 5, 3, generator=generator)
    plain, sharded = nn.Linear(3, 5, bias=False), nn.Linear(3, 5, bias=False)
    plain.weight = nn.Parameter(weight.clone())
    sharded.weight = nn.Parameter(rank_1_rows(weight))
    runs = []
    for layer in (plain, sharded):
        optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, weight_decay=0.1, foreach=False)
        cdb = ChannelDropBack(layer, config)
        cdb.attach(optimizer)
        masks = []
        for grad in grads:
            layer.weight.grad = grad.clone() if layer is plain else rank_1_rows(grad)
            optimizer.step()
            masks.append(cdb.last_selection["weight"].cpu())
        runs.append((layer.weight.detach(), optimizer.state[layer.weight], torch.stack(masks)))
    (full, full_state, keep), (local, local_state, local_keep) = runs
    assert torch.equal(keep, local_keep), "drawn over the global shape: the same selection"
    assert not keep[:, 3:].all() and keep[:, 3:].any(), "rank 1's rows were dropped and kept in these steps"
    assert torch.equal(local.to_local(), full[3:])
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(local_state[key].to_local(), full_state[key][3:]), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device of the mask matters only off the CPU")
def test_the_local_mask_is_built_on_the_device_of_the_dropped_indices():
    dropped = torch.tensor([0, 4], device="cuda")
    rows = _DroppedRows(_Selected("w", nn.Parameter(torch.zeros(5, 3, device="cuda")), 0, 5, dropped, 1.0, (3, 2), 2))
    shard = torch.ones(2, 3, device="cuda")  # rows 3-4 of 5: row 4 is dropped
    rows.zero_(shard)
    assert rows.local_mask.device == dropped.device
    assert shard[0].eq(1).all() and shard[1].eq(0).all()
