"""What does ChannelDropBack cost per training iteration?

Times one iteration (forward, backward, optimizer step) of a small ViT and a small ConvNeXt without
CDB, with CDB in grad mode and in exact mode, for SGD (foreach) and AdamW (foreach). The variants
share one model and optimizer (CDB is attached for its own iterations only) and are interleaved
iteration by iteration, so that machine noise hits them alike; each cell is the median over all
iterations, and the ratios are against the baseline measured in the same run. Because end-to-end ratios
on a busy CPU carry a few tenths of a percent of noise, the script also times the CDB hooks alone
(before_step + after_step on the same gradients) and reports them as a share of the iteration.

    python bench/overhead.py                 # CPU, about 3 minutes
    python bench/overhead.py --device cuda   # GPU: timed with CUDA events
    python bench/overhead.py --quick         # a 20-second smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

from cdb_hf import ChannelDropBack, ChannelDropBackConfig

VARIANTS = ("none", "grad", "exact")


def build_model(name: str, size: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vit":
        if size == "base":
            config = ViTConfig(image_size=224, patch_size=16, num_labels=100)  # ViT-B/16
        else:
            config = ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                               image_size=32, patch_size=4, num_labels=10)
        return ViTForImageClassification(config)
    if size == "base":
        config = ConvNextConfig(num_labels=100, image_size=224)  # ConvNeXt-T
    else:
        config = ConvNextConfig(hidden_sizes=[48, 96, 192, 384], depths=[1, 1, 3, 1], num_labels=10, image_size=32)
    return ConvNextForImageClassification(config)


def make_optimizer(name: str, params, device: str) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05, foreach=True)


class Timer:
    """Wall-clock on CPU; CUDA events (no host sync inside the timed region) on GPU."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1e3
        else:
            self.seconds = time.perf_counter() - self.t0


def bench_pair(model_name: str, optimizer_name: str, args) -> dict:
    device = args.device
    size = "base" if device.startswith("cuda") and not args.small else "small"
    image_size = 224 if size == "base" else 32
    # One model and one optimizer for all variants: CDB is attached for the timed iteration only, so
    # the variants share every tensor, allocation and cache line and differ in CDB alone.
    model = build_model(model_name, size).to(device)
    optimizer = make_optimizer(optimizer_name, model.parameters(), device)
    cdbs = {mode: ChannelDropBack(model, ChannelDropBackConfig(mode=mode, layer_selection=args.layer_selection,
                                                               layer_rate=args.layer_rate))
            for mode in ("grad", "exact")}
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=generator).to(device)

    def iteration(variant: str) -> float:
        handle = cdbs[variant].attach(optimizer) if variant != "none" else None
        with Timer(device) as timer:
            loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if handle is not None:
            handle.remove()
        return timer.seconds

    for variant in VARIANTS:  # warm-up: allocator, optimizer state, kernels
        for _ in range(args.warmup):
            iteration(variant)
    # Round-robin at the iteration level (alternating direction) so drifts in machine load hit all alike.
    times = {variant: [] for variant in VARIANTS}
    for index in range(args.rounds * args.iters):
        for variant in (VARIANTS if index % 2 == 0 else VARIANTS[::-1]):
            times[variant].append(iteration(variant))

    # The hooks alone, on real gradients, for the same models.
    hook_times = {}
    for variant, cdb in cdbs.items():
        loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
        loss.backward()
        grads = [(p, p.grad.clone()) for p in model.parameters() if p.grad is not None]
        samples = []
        for _ in range(args.rounds * args.iters):
            for p, grad in grads:  # the same real gradients each time (the rescale works in place)
                p.grad.copy_(grad)
            with Timer(device) as timer:
                cdb.before_step(optimizer)
                cdb.after_step(optimizer)
            samples.append(timer.seconds)
        optimizer.zero_grad(set_to_none=True)
        hook_times[variant] = statistics.median(samples)

    medians = {v: statistics.median(t) for v, t in times.items()}
    return {
        "model": model_name, "optimizer": optimizer_name, "size": size,
        "iteration_ms": {v: medians[v] * 1e3 for v in VARIANTS},
        "ratio": {v: medians[v] / medians["none"] for v in ("grad", "exact")},
        "hook_share": {v: hook_times[v] / medians["none"] for v in ("grad", "exact")},
    }


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} / torch {torch.__version__}"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads / torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="Small models on GPU too.")
    parser.add_argument("--layer_selection", default="single", choices=["single", "bernoulli"],
                        help="CDB's layer selection (default: the paper's one layer per step).")
    parser.add_argument("--layer_rate", type=float, default=1.0, help="CDB's layer_rate.")
    parser.add_argument("--quick", action="store_true", help="Few repeats: a smoke run, not a measurement.")
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.iters, args.warmup = 2, 2, 1

    results = [bench_pair(m, o, args) for m in ("vit", "convnext") for o in ("sgd", "adamw")]
    print(f"machine: {machine()}; batch {args.batch_size}; median of {args.rounds * args.iters} iterations; "
          f"CDB layer_selection={args.layer_selection}, layer_rate={args.layer_rate}")
    header = (f"{'model':<9} {'optim':<6} {'none ms':>8} {'grad ms':>8} {'exact ms':>9} "
              f"{'grad x':>7} {'exact x':>8} {'hooks grad':>11} {'hooks exact':>12}")
    print(header)
    for r in results:
        ms, ratio, share = r["iteration_ms"], r["ratio"], r["hook_share"]
        print(f"{r['model']:<9} {r['optimizer']:<6} {ms['none']:>8.2f} {ms['grad']:>8.2f} {ms['exact']:>9.2f} "
              f"{ratio['grad']:>7.3f} {ratio['exact']:>8.3f} {share['grad']:>10.2%} {share['exact']:>12.2%}")
    print("targets: grad <= 1.01x, exact <= 1.03x (the 'hooks' columns are CDB's own cost as a share of "
          "the baseline iteration)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "layer_selection": args.layer_selection, "layer_rate": args.layer_rate,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
