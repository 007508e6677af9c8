"""The reference for bench/throughput.py: a plain transformers Trainer script, written the way
transformers' examples/pytorch/image-classification/run_image_classification.py writes it.

Same model, data, batch size and steps as our CLI; nothing of cdb_hf except the built-in dataset's
loader (the data itself). Images are decoded from the dataset on every access and transformed with a
torchvision ``Compose`` on PIL images through ``set_transform``; the DataLoader keeps the Trainer's
defaults unless ``--dataloader_num_workers`` is given. The model keeps PyTorch's default memory format. Prints one JSON line with the Trainer's training metrics.

    python bench/plain_trainer_baseline.py --model_name_or_path DIR --max_steps 30
"""

from __future__ import annotations

import argparse
import json
import tempfile

import torch
from torchvision.transforms import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

from cdb_hf.builtin import load_builtin_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--dataset_name", default="builtin:mnist5k")
    parser.add_argument("--max_train_samples", type=int, default=1000)
    parser.add_argument("--per_device_train_batch_size", type=int, default=32)
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)  # the TrainingArguments flag and default
    parser.add_argument("--optim", choices=("adamw_torch", "adamw_torch_fused"), default="adamw_torch")
    args = parser.parse_args()

    dataset = load_builtin_dataset(args.dataset_name)
    splits = dataset["train"].train_test_split(test_size=0.15, seed=args.seed)
    train_dataset = splits["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
    labels = train_dataset.features["label"].names

    image_processor = AutoImageProcessor.from_pretrained(args.model_name_or_path)
    model = AutoModelForImageClassification.from_pretrained(
        args.model_name_or_path, num_labels=len(labels), label2id={label: i for i, label in enumerate(labels)},
        id2label=dict(enumerate(labels)), ignore_mismatched_sizes=True)

    # The example reads size/mean/std from image_processor.size / image_mean / image_std; a timm checkpoint
    # keeps them in its data_config instead.
    config = getattr(image_processor, "data_config", None)
    if config is not None:
        size = tuple(config["input_size"][-2:])
        normalize = Normalize(mean=config["mean"], std=config["std"])
    else:
        size = (image_processor.size["height"], image_processor.size["width"])
        normalize = Normalize(mean=image_processor.image_mean, std=image_processor.image_std)
    train_transforms = Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), normalize])

    def preprocess_train(example_batch):
        example_batch["pixel_values"] = [train_transforms(image.convert("RGB")) for image in example_batch["image"]]
        return example_batch

    train_dataset.set_transform(preprocess_train)

    def collate_fn(examples):
        pixel_values = torch.stack([example["pixel_values"] for example in examples])
        labels = torch.tensor([example["label"] for example in examples])
        return {"pixel_values": pixel_values, "labels": labels}

    with tempfile.TemporaryDirectory() as output_dir:
        training_args = TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=args.per_device_train_batch_size,
            max_steps=args.max_steps, learning_rate=args.learning_rate, optim=args.optim, seed=args.seed,
            remove_unused_columns=False, save_strategy="no", eval_strategy="no", report_to="none",
            logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=args.dataloader_num_workers)
        trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset,
                          processing_class=image_processor, data_collator=collate_fn)
        result = trainer.train()
    print(json.dumps({"metrics": result.metrics}))


if __name__ == "__main__":
    main()
