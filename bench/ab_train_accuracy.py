"""How well did each arm of an A/B study fit its training set? (Did the benchmark train to convergence?)

Reloads every arm's saved model of a finished ``--ab_seeds`` study and measures its accuracy on the very
training subset it was trained on (the recipe's data flags and the arm's seed give the same split and
subset) and on the validation split, with the checkpoint's evaluation preprocessing. The validation
figure must match the study's own ``eval_accuracy``: a check that the split was rebuilt correctly.

    python bench/ab_train_accuracy.py bench/results/ab_mnist1000_seeds1000-1009 \
        recipes/efficientnet-lite0_mnist5k_ab.yaml --image_size 32

Writes ``train_accuracy.json`` beside the study's ``results.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from cdb_hf import cli, sources, transforms


@torch.no_grad()
def accuracy(model: torch.nn.Module, split, transform, batch_size: int = 200) -> float:
    correct = 0
    for start in range(0, len(split), batch_size):
        rows = split[start:start + batch_size]
        pixels = torch.stack([transform(image) for image in rows["image"]])
        predicted = model(pixel_values=pixels).logits.argmax(-1)
        correct += int((predicted == torch.tensor(rows["label"])).sum())
    return correct / len(split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", type=Path, help="the --output_dir of a finished A/B study (holds results.json)")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="the study's recipe and flags (data flags matter)")
    own = parser.parse_args()
    model_args, data_args, *_ = cli.parse_args([*own.flags, "--output_dir", str(own.study / "unused")])
    results = json.loads((own.study / "results.json").read_text())
    torch.set_grad_enabled(False)
    rows = []
    for run in results["runs"]:
        if run["status"] != "ok":
            continue
        arm_dir = Path(run["output_dir"])
        if not arm_dir.is_dir():  # the study was moved: its arms lie beside results.json
            arm_dir = own.study / f"seed{run['seed']}" / run["arm"]
        splits = sources.load_image_datasets(data_args, seed=run["seed"])
        model = AutoModelForImageClassification.from_pretrained(arm_dir).eval()
        processor = AutoImageProcessor.from_pretrained(arm_dir)
        _, evaluate = transforms.build_transforms(processor, "none")
        row = {"seed": run["seed"], "arm": run["arm"], "train_images": len(splits["train"]),
               "train_accuracy": accuracy(model, splits["train"], evaluate),
               "eval_accuracy": accuracy(model, splits["validation"], evaluate),
               "study_eval_accuracy": run["metrics"].get("eval_accuracy")}
        rows.append(row)
        print(f"seed {row['seed']} {row['arm']:>8}: train {100 * row['train_accuracy']:.2f} %  validation "
              f"{100 * row['eval_accuracy']:.2f} % (study: {100 * row['study_eval_accuracy']:.2f} %)", flush=True)
    summary = {}
    for arm in dict.fromkeys(row["arm"] for row in rows):
        values = [row["train_accuracy"] for row in rows if row["arm"] == arm]
        summary[arm] = {"train_accuracy_mean": statistics.mean(values), "train_accuracy_min": min(values)}
        print(f"{arm:>8}: training accuracy mean {100 * statistics.mean(values):.2f} %, min {100 * min(values):.2f} %")
    (own.study / "train_accuracy.json").write_text(json.dumps({"runs": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
