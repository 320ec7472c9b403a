"""File contracts between stages: the README's checkpoint schema is exactly what the scripts write."""
import re
import subprocess
import sys

import td3_bc_offline as tb
from conftest import ROOT


def documented_checkpoint_keys() -> set:
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- checkpoint-schema:start -->")[1].split("<!-- checkpoint-schema:end -->")[0]
    keys = set()
    for line in table.splitlines()[2:]:
        first_cell = line.split("|")[1]
        keys |= set(re.findall(r"`([a-z_]+)`", first_cell))
    return keys


def test_readme_schema_matches_written_checkpoint(hopper_datasets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tb.main(tb.Args(dataset_id=hopper_datasets["random"], total_steps=4, eval_freq=4, eval_episodes=1, batch_size=8,
                    cuda=False, run_name="schema"))
    ckpt = tb.load_checkpoint("runs/schema/checkpoint.pt")
    assert set(ckpt) == documented_checkpoint_keys()
    assert ckpt["format"] == tb.CHECKPOINT_FORMAT and ckpt["format_version"] == tb.CHECKPOINT_VERSION
    assert ckpt["stage"] == "td3_bc_offline"


def test_benchmark_script_runs_at_tiny_size():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "measure_data_and_pretrain.py"), "--env-id",
                           "InvertedPendulum-v5", "--transitions", "500", "--train-steps", "600", "--updates", "200"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| TD3+BC updates/s" in proc.stdout and "machine:" in proc.stdout


def test_checkpoint_acts_identically_in_every_stage_script(hopper_checkpoint):
    """The Actor and checkpoint loader are copied into each stage script: a checkpoint written by td3_bc_offline.py
    must load and give bit-identical actions in all of them."""
    import torch

    import de_perturbations as de
    ckpt = tb.load_checkpoint(hopper_checkpoint)
    obs = (torch.randn(64, ckpt["obs_dim"]) * 3 - ckpt["obs_mean"]) / ckpt["obs_std"]
    reference = tb.actor_from_checkpoint(ckpt)(obs)
    for module in (de,):
        other = module.actor_from_checkpoint(module.load_checkpoint(hopper_checkpoint))
        assert torch.equal(other(obs), reference), module.__name__
        assert module.CHECKPOINT_FORMAT == tb.CHECKPOINT_FORMAT


def test_error_messages_for_a_missing_checkpoint_agree(tmp_path):
    import de_perturbations as de
    for module in (tb, de):
        try:
            module.load_checkpoint(str(tmp_path / "none.pt"))
        except module.UserError as e:
            assert "not found" in str(e) and "td3_bc_offline.py" in str(e)
        else:
            raise AssertionError(module.__name__)
