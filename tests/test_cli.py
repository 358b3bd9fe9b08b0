"""`make demo`'s job: LoRA training on the synthetic task lowers the loss."""
import json
import os

import safetensors.torch
import torch

from lowrank import cli


def test_demo_loss_goes_down_and_saves_a_peft_adapter(tmp_path):
    losses = cli.demo(steps=25, rank=4, quiet=True, out_dir=str(tmp_path))
    assert len(losses) == 25 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    keys = safetensors.torch.load_file(str(tmp_path / "adapter_model.safetensors")).keys()
    assert len(keys) == 2 * 7 * 4 and all(k.startswith("base_model.model.model.layers.") for k in keys)


def test_synthetic_task_is_learnable_structure():
    ids = cli.synthetic_batch(8, 12, 64, torch.Generator().manual_seed(0))
    diffs = (ids[:, 1:] - ids[:, :-1]) % 64
    assert ((diffs == diffs[:, :1]) & (diffs[:, :1] >= 1) & (diffs[:, :1] <= 3)).all()


def test_lowrank_bench_runs_python_m_bench_in_the_checkout(monkeypatch, capsys):
    from lowrank import cli

    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    assert cli.main(["bench", "--quick", "--only", "merge", "--no-static"]) == 0
    (cmd, cwd), = calls
    assert cmd[1:] == ["-m", "bench", "--quick", "--only", "merge", "--no-static"]
    assert os.path.isfile(os.path.join(cwd, "bench", "__main__.py"))
    monkeypatch.setattr(cli, "bench_root", lambda: None)
    assert cli.main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_a_torchrun_worker_leaves_with_its_code_and_its_output_flushed(tmp_path):
    """Under torchrun (WORLD_SIZE > 1) the CLI leaves through os._exit (gloo's teardown at interpreter
    exit aborted a finished worker now and then): the exit code and everything printed must survive,
    and a plain process still exits through sys.exit (atexit handlers run)."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import atexit, sys\n"
            "from lowrank.cli import _exit\n"
            "atexit.register(lambda: sys.stdout.write('atexit ran\\n'))\n"
            "print('trained', end='')\n"
            "sys.stderr.write('to stderr')\n"
            "_exit(3)\n")
    for world, atexit_ran in (("2", False), ("1", True)):
        env = {**os.environ, "PYTHONPATH": root, "WORLD_SIZE": world}
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                              cwd=str(tmp_path))
        assert proc.returncode == 3, (world, proc.stderr)
        assert proc.stdout.startswith("trained"), (world, proc.stdout)
        assert proc.stderr.endswith("to stderr"), (world, proc.stderr)
        assert ("atexit ran" in proc.stdout) == atexit_ran, (world, proc.stdout)
