"""The README's core example runs as written and prints what it says."""

import ast
import re
from pathlib import Path

import torch

from cdb_hf import ChannelDropBack, ChannelDropBackConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_core_example_runs_as_written(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "cdb.attach(optimizer)" in b)
    exec(compile(example, str(README), "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    steps = [int(line.split(maxsplit=1)[0]) for line in lines]
    printed = [ast.literal_eval(line.split(maxsplit=1)[1]) for line in lines]
    assert steps == [1, 2, 3]
    # A selection is a pure function of (seed, step): the same config on a model of the same shapes draws
    # the same layer and the same number of kept rows at each step, whatever the weights and data.
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    cdb = ChannelDropBack(model, ChannelDropBackConfig(channel_rate=0.3, mode="exact"))
    expected = []
    for _ in range(3):
        cdb.before_step(torch.optim.SGD(model.parameters(), lr=0.0))
        expected.append({name: int(mask.sum()) for name, mask in cdb.last_selection.items()})
        cdb.after_step(torch.optim.SGD(model.parameters(), lr=0.0))
    assert printed == expected
    assert all(len(selection) == 1 for selection in printed)  # one layer selected per step, by default
    assert all(0 < kept < {"0.weight": 32, "2.weight": 4}[name] for s in printed for name, kept in s.items())
