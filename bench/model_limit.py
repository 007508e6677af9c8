"""The compute-bound limit for bench/throughput.py: the model alone, training on one in-memory batch.

No data loading, no transforms, no Trainer: load the checkpoint as our CLI does (a new 10-class head,
channels_last weights unless ``--channels_last false``), then time ``--max_steps`` AdamW steps
(forward, loss, backward, step, zero_grad; ``--optim`` picks the AdamW implementation as the CLI's flag
does) on one fixed batch, with the process's default intra-op
threads, the same as the CLI's. Steps are timed the way the Trainer's ``train_runtime`` counts them, the
first one included. Prints one JSON line ``{"metrics": {"train_runtime": seconds}}``.

    python bench/model_limit.py --model_name_or_path DIR --max_steps 30
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForImageClassification

from cdb_hf.perf import apply_memory_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_labels", type=int, default=10)
    parser.add_argument("--channels_last", choices=("true", "false"), default="true")
    parser.add_argument("--optim", choices=("adamw_torch", "adamw_torch_fused"), default="adamw_torch",
                        help="torch.optim.AdamW as the CLI builds it for this name: torch's own choice of "
                             "implementation (on the CPU the per-parameter loop), or fused=True.")
    args, _ = parser.parse_known_args()  # the flags of the data path (e.g. --max_train_samples) do not apply

    torch.manual_seed(args.seed)
    model = AutoModelForImageClassification.from_pretrained(args.model_name_or_path, num_labels=args.num_labels,
                                                            ignore_mismatched_sizes=True)
    apply_memory_format(model, args.channels_last == "true")
    model.train()
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    size = _input_size(config)
    pixel_values = torch.randn(args.per_device_train_batch_size, 3, *size)
    labels = torch.randint(0, args.num_labels, (args.per_device_train_batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate,
                                  **({"fused": True} if args.optim == "adamw_torch_fused" else {}))

    tic = time.perf_counter()
    for _ in range(args.max_steps):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()  # the only sync: CPU work has finished anyway, but keep the timing honest on a GPU
    runtime = time.perf_counter() - tic
    print(json.dumps({"metrics": {"train_runtime": runtime}}))


def _input_size(config) -> tuple[int, int]:
    pretrained_cfg = getattr(config, "pretrained_cfg", None)  # timm checkpoints
    if isinstance(pretrained_cfg, dict) and "input_size" in pretrained_cfg:
        return tuple(int(v) for v in pretrained_cfg["input_size"][-2:])
    size = config.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


if __name__ == "__main__":
    main()
