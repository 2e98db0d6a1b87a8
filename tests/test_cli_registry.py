"""Every area's command is reachable through `lorakit` itself (not only through its own function)."""

import json

import pytest
import torch
from torch import nn

import lorakit
from lorakit.cli import app as cli


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge", "info", "estimate", "analyze", "compose"])
def test_help_of_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"lorakit {command}" in capsys.readouterr().out


def test_analyze_runs_from_the_command_line(tmp_path, capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=3, target_modules=["0"], init_lora_weights=False))
    lorakit.save_adapter(model, tmp_path / "a")
    code = cli.main(["analyze", str(tmp_path / "a"), "--out", str(tmp_path / "out"), "--no-plots", "--quiet"])
    assert code == 0
    layers = json.loads((tmp_path / "out" / "analysis.json").read_text())["adapter"]["layers"]
    delta = model[0].deltas["default"].delta_weight(model[0])
    assert [layer["path"] for layer in layers] == ["0"] and layers[0]["rank"] == 3
    assert layers[0]["singular_values"] == pytest.approx(torch.linalg.svdvals(delta)[:3].tolist(), rel=1e-5)
