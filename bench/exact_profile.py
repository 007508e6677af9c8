"""Where does exact mode's time go with many layers a step? (small ConvNeXt, AdamW, CPU)

Profiles ChannelDropBack's hooks alone (``before_step`` + ``after_step`` on the same real gradients)
with ``bernoulli`` layers at rate 0.5 and channel rate 0.5, the demo's setting, on bench/overhead.py's
small ConvNeXt, and prints per optimizer step: the plain iteration, the hooks in grad and exact mode,
each aten kernel's time, and the bytes exact mode must move (the dropped rows of the weight and of
Adam's two moments, out before the step and back after it) with the bandwidth this implies. It also
measures this machine's memory copy bandwidth (one thread, a tensor far larger than the caches) and
turns the bytes the hooks cannot avoid (that save and restore, plus the rescale's read and write of
every selected gradient; in grad mode the rescale and the zeroed rows) into a lower bound on their
time, as a share of the iteration.

    python bench/exact_profile.py

It then times, on the model's largest selected weight shape, the row kernels exact mode uses against
the alternatives one might try (a broadcast row mask with ``masked_fill_``/``where``,
``masked_scatter_``, ``index_put_``, sorted indices), single-threaded as the hooks run them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import ConvNextConfig, ConvNextForImageClassification

import cdb_hf.core as core
from cdb_hf import ChannelDropBack, ChannelDropBackConfig

SETTING = {"layer_selection": "bernoulli", "layer_rate": 0.5, "channel_rate": 0.5}


def row_kernels(weight: torch.Tensor, reps: int = 200) -> dict[str, float]:
    """Median microseconds of each way to zero / save / restore half the rows of a tensor like ``weight``."""
    tensor = weight.detach().clone()
    rows = tensor.shape[0]
    index = torch.randperm(rows)[: rows // 2]
    mask = torch.zeros(rows, dtype=torch.bool).index_fill_(0, index, True).view(rows, *[1] * (tensor.dim() - 1))
    saved, full, zero = tensor.index_select(0, index), tensor.clone(), torch.zeros((), dtype=tensor.dtype)
    candidates = {
        "zero: index_fill_ (used; grad mode)": lambda: tensor.index_fill_(0, index, 0),
        "zero: masked_fill_ (row mask)": lambda: tensor.masked_fill_(mask, 0),
        "zero: where (row mask)": lambda: torch.where(mask, zero, tensor, out=tensor),
        "save: index_select (used)": lambda: tensor.index_select(0, index),
        "save: index_select, sorted": lambda: tensor.index_select(0, index.sort().values),
        "save: clone (whole tensor)": lambda: tensor.clone(),
        "restore: index_copy_ (used)": lambda: tensor.index_copy_(0, index, saved),
        "restore: index_copy_, sorted": lambda: tensor.index_copy_(0, index.sort().values, saved),
        "restore: index_put_": lambda: tensor.index_put_((index,), saved),
        "restore: where from a whole copy": lambda: torch.where(mask, full, tensor, out=tensor),
        "restore: masked_scatter_": lambda: tensor.masked_scatter_(mask.expand_as(tensor), saved),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        timings = {}
        for name, kernel in candidates.items():
            for _ in range(10):
                kernel()
            samples = []
            for _ in range(reps):
                tic = time.perf_counter()
                kernel()
                samples.append(time.perf_counter() - tic)
            timings[name] = statistics.median(samples) * 1e6
        return timings
    finally:
        torch.set_num_threads(threads)


def copy_bandwidth_gb_s(megabytes: int = 256, reps: int = 5) -> float:
    """Bytes read plus bytes written per second by one thread copying a tensor far larger than the caches."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target.copy_(source)
        samples = []
        for _ in range(reps):
            tic = time.perf_counter()
            target.copy_(source)
            samples.append(time.perf_counter() - tic)
    finally:
        torch.set_num_threads(threads)
    return 2 * source.numel() * 4 / statistics.median(samples) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = ConvNextForImageClassification(ConvNextConfig(hidden_sizes=[48, 96, 192, 384], depths=[1, 1, 3, 1],
                                                          num_labels=10, image_size=32))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, foreach=True)
    pixels, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))

    def iteration() -> float:
        tic = time.perf_counter()
        torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - tic

    for _ in range(3):
        iteration()
    iteration_s = statistics.median(iteration() for _ in range(args.steps // 2))
    torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
    grads = [(p, p.grad.clone()) for p in model.parameters() if p.grad is not None]

    def hooks(cdb: ChannelDropBack) -> float:
        for param, grad in grads:  # the same real gradients each time (the rescale works in place)
            param.grad.copy_(grad)
        tic = time.perf_counter()
        cdb.before_step(optimizer)
        cdb.after_step(optimizer)
        return time.perf_counter() - tic

    def interleaved(cdb: ChannelDropBack, setups: dict) -> dict[str, float]:
        """Median ms of the hooks under each setup (a callable run before them), alternating setups and their
        order step by step, each on the same selection, so that machine noise hits all alike."""
        samples = {name: [] for name in setups}
        for step in range(args.steps):
            for name in list(setups) if step % 2 else list(setups)[::-1]:
                setups[name]()
                cdb.step = step
                samples[name].append(hooks(cdb))
        return {name: statistics.median(times) * 1e3 for name, times in samples.items()}

    results = {"iteration_ms": iteration_s * 1e3}
    # One intra-op thread (what the hooks do) against all of them.
    one_thread = core._one_cpu_thread
    try:
        for mode in ("grad", "exact"):
            cdb = ChannelDropBack(model, ChannelDropBackConfig(mode=mode, **SETTING))
            medians = interleaved(cdb, {
                "one": lambda: setattr(core, "_one_cpu_thread", one_thread),
                "all": lambda: setattr(core, "_one_cpu_thread", lambda work: contextlib.nullcontext())})
            results[f"hooks_{mode}_ms"], results[f"hooks_{mode}_all_threads_ms"] = medians["one"], medians["all"]
    finally:
        core._one_cpu_thread = one_thread
    # Exact mode leaves the dropped gradient rows alone for element-wise torch optimizers; what does that save?
    # An AdamW subclass (which CDB cannot vouch for) gets the zeroing.
    unknown_type = type("AdamWSubclass", (torch.optim.AdamW,), {})
    try:
        results["hooks_exact_interleaved_ms"] = interleaved(
            ChannelDropBack(model, ChannelDropBackConfig(mode="exact", **SETTING)),
            {"zeroing the dropped gradient rows": lambda: setattr(optimizer, "__class__", unknown_type),
             "leaving them (AdamW)": lambda: setattr(optimizer, "__class__", torch.optim.AdamW)})
    finally:
        optimizer.__class__ = torch.optim.AdamW
    cdb = ChannelDropBack(model, ChannelDropBackConfig(mode="exact", **SETTING))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            hooks(cdb)
    kernels = {e.key: e.self_cpu_time_total / args.steps / 1e3 for e in prof.key_averages()
               if e.key.startswith("aten::index") or e.key in ("aten::mul", "aten::randperm")}
    eligible = sum(p.numel() for p in cdb.layers.values())
    dropped_bytes = eligible * SETTING["layer_rate"] * SETTING["channel_rate"] * 4  # fp32, per tensor
    moved = dropped_bytes * 3 * 2  # weight + 2 moments, each read and written once by the save (and the restore)
    rescale = eligible * SETTING["layer_rate"] * 4 * 2  # every selected gradient read and written once
    bandwidth = copy_bandwidth_gb_s()
    bound_ms = (2 * moved + rescale) / (bandwidth * 1e9) * 1e3
    zeroed = dropped_bytes  # grad mode also writes zeros over the dropped gradient rows
    grad_bound_ms = (rescale + zeroed) / (bandwidth * 1e9) * 1e3
    results.update({"kernels_ms_per_step": kernels, "eligible_elements": eligible,
                    "save_traffic_mb": moved / 1e6, "rescale_traffic_mb": rescale / 1e6,
                    "copy_bandwidth_gb_s": bandwidth, "exact_lower_bound_ms": bound_ms,
                    "grad_lower_bound_ms": grad_bound_ms,
                    "index_select_gb_s": moved / (kernels.get("aten::index_select", float("nan")) * 1e-3) / 1e9,
                    "index_copy_gb_s": moved / (kernels.get("aten::index_copy_", float("nan")) * 1e-3) / 1e9})
    print(f"iteration {results['iteration_ms']:.1f} ms; hooks grad {results['hooks_grad_ms']:.2f} ms "
          f"({100 * results['hooks_grad_ms'] / results['iteration_ms']:.2f} %), exact {results['hooks_exact_ms']:.2f} ms "
          f"({100 * results['hooks_exact_ms'] / results['iteration_ms']:.2f} %); on all {torch.get_num_threads()} "
          f"threads instead of one: grad {results['hooks_grad_all_threads_ms']:.2f} ms, exact "
          f"{results['hooks_exact_all_threads_ms']:.2f} ms")
    print("exact mode, interleaved: " + ", ".join(f"{name} {ms:.2f} ms"
                                                  for name, ms in results["hooks_exact_interleaved_ms"].items()))
    for name, ms in sorted(kernels.items(), key=lambda item: -item[1]):
        print(f"  {name:22} {ms:.3f} ms/step")
    print(f"exact mode's save reads + writes {results['save_traffic_mb']:.1f} MB a step, its restore the same: "
          f"index_select at {results['index_select_gb_s']:.1f} GB/s, index_copy_ at {results['index_copy_gb_s']:.1f} GB/s")
    print(f"memory copy bandwidth (1 thread, read + write): {bandwidth:.1f} GB/s; the save, the restore and the "
          f"rescale ({rescale / 1e6:.1f} MB) cannot take less than {bound_ms:.2f} ms a step, "
          f"{100 * bound_ms / results['iteration_ms']:.2f} % of the iteration; grad mode's rescale and zeroing "
          f"({(rescale + zeroed) / 1e6:.1f} MB) no less than {grad_bound_ms:.2f} ms, "
          f"{100 * grad_bound_ms / results['iteration_ms']:.2f} %")
    results["row_kernels_us"] = row_kernels(max((p for p in cdb.layers.values()), key=torch.Tensor.numel),
                                          reps=max(2 * args.steps, 10))
    print("row kernels on one", "x".join(map(str, max(cdb.layers.values(), key=torch.Tensor.numel).shape)),
          "weight, half its rows, 1 thread (us):")
    for name, us in results["row_kernels_us"].items():
        print(f"  {name:34} {us:8.1f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
