"""bench/throughput.py end to end on a tiny setting: the limit and one CLI variant, one step each."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("bench_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cdb_settings_are_the_paper_default_and_the_demo_recipes(throughput):
    settings = throughput.cdb_settings()
    assert settings["cdb"] == []  # --cdb true alone: the paper's defaults
    demo = dict(zip(settings["cdb_demo"][::2], settings["cdb_demo"][1::2]))
    assert demo["--cdb_layer_selection"] == "bernoulli" and demo["--cdb_mode"] == "exact"


def test_variants_must_include_the_limit(throughput):
    with pytest.raises(SystemExit):
        throughput.parse_args(["--variants", "hf,plain"])


def test_throughput_runs_end_to_end_and_reports_fractions_of_the_limit(throughput, tiny_vit_dir, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(throughput, "prepare_checkpoint", lambda model, image_size: tiny_vit_dir)
    out = tmp_path / "throughput.json"
    payload = throughput.main(["--variants", "limit,hf+cdb", "--rounds", "1", "--max_steps", "2", "--batch_size", "4",
                               "--max_train_samples", "16", "--json", str(out), "--note", "test"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(payload))
    assert payload["fraction_of_limit"]["limit"] == 1.0
    assert payload["fraction_of_limit"]["hf+cdb"] > 0
    assert payload["ratio_vs_plain"] is None  # no plain variant in this run
    assert payload["setup"]["note"] == "test" and payload["setup"]["gpu"] == "none"
    for variant in ("limit", "hf+cdb"):
        sample = payload["samples"][variant][0]
        assert sample["images_per_s"] == pytest.approx(2 * 4 / sample["train_runtime"])


def test_optim_reaches_every_variant_the_limit_included(throughput, tmp_path):
    args = throughput.parse_args(["--optim", "adamw_torch_fused", "--variants", "limit,hf+cdb,plain"])
    for variant in ("limit", "plain", "hf+cdb", "accelerate"):
        argv = throughput.command(variant, tmp_path / "ckpt", tmp_path / "out", args)
        assert argv[argv.index("--optim") + 1] == "adamw_torch_fused" and argv.count("--optim") == 1, variant
    assert throughput.parse_args(["--variants", "limit"]).optim == "adamw_torch"
