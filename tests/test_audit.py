"""Bad inputs and faults found by the third audit: each case fails on the code before its fix."""

import os

import pytest
import torch

from rayreward import cli, config, methods, models, runfolder
from rayreward.errors import RunFolderBusy

from helpers import ROOT


def test_the_run_lock_never_writes_through_a_symlink(tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "run"
    out.mkdir()
    (out / runfolder.LOCK_FILE).symlink_to(victim)
    with pytest.raises(RunFolderBusy, match="is a symbolic link"):
        runfolder.RunLock(out).acquire()
    assert victim.read_text() == "precious"
    # the CLI: exit 2 before Ray or any model starts, the victim untouched
    code = cli.main(["train", "--config", str(ROOT / "experiments/tiny.yaml"), "--set", f"output_dir={out}"])
    assert code == 2 and "symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious"


def test_the_run_lock_refuses_a_fifo_instead_of_hanging(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    os.mkfifo(out / runfolder.LOCK_FILE)
    with pytest.raises(RunFolderBusy, match="not a regular file"):
        runfolder.RunLock(out).acquire()


def test_a_metrics_rewrite_cut_short_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "metrics.csv"
    log = runfolder.MetricsLog(path, 0)
    for step in range(3):
        log.append({"step": step, "reward_mean": 0.1 * step})
    before = path.read_text()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runfolder.csv.DictWriter, "writerows", full_disk)
    with pytest.raises(OSError):
        runfolder.MetricsLog(path, 2)  # a resume at step 2 rewrites the file
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]  # no temporary file left


@pytest.fixture(scope="module")
def lora_folder(tmp_path_factory):
    c = models.load_components(config.ModelConfig(name="tiny"))
    for p in models.add_lora(c.unet, config.LoraConfig()):
        torch.nn.init.normal_(p, std=0.01)
    from rayreward import lora_io

    folder = tmp_path_factory.mktemp("run") / "lora"
    lora_io.save_lora(c.unet, folder, c.flavour)
    return folder


def test_export_refuses_an_existing_out_and_never_overwrites_its_input(lora_folder, tmp_path, capsys):
    source = lora_folder / "pytorch_lora_weights.safetensors"
    original = source.read_bytes()
    for extra in ([], ["--force"]):  # the LoRA being exported is never the target, even with --force
        assert cli.main(["export", "--lora", str(lora_folder), "--format", "kohya", "--out", str(source), *extra]) == 2
        assert "is the LoRA being exported" in capsys.readouterr().err
    assert source.read_bytes() == original
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"another run's file")
    assert cli.main(["export", "--lora", str(lora_folder), "--format", "kohya", "--out", str(other)]) == 2
    assert "exists; choose a new file, or add --force" in capsys.readouterr().err
    assert other.read_bytes() == b"another run's file"
    assert cli.main(["export", "--lora", str(lora_folder), "--format", "kohya", "--out", str(other), "--force"]) == 0
    assert other.read_bytes() != b"another run's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.safetensors"]  # written whole, no temporary left


@pytest.mark.parametrize("call, needle", [
    (lambda: methods.plan_drtune(5, 2, 9), "plan_drtune: m=9 (need 1 <= m <= T)"),
    (lambda: methods.plan_drtune(5, 6, 2), "plan_drtune: K=6 (need 1 <= K <= T)"),
    (lambda: methods.plan_drtune(0, 1, 1), "plan_drtune: T=0 (need an integer >= 1)"),
    (lambda: methods.plan_draft_k(4, 5), "plan_draft_k: K=5"),
    (lambda: methods.plan_draft_lv(4, 0), "plan_draft_lv: n=0"),
    (lambda: methods.plan_refl(10, (3, 12)), "plan_refl: window=(3, 12)"),
    (lambda: methods.plan_alignprop(10, (0, 3), []), "plan_alignprop: k_range=(0, 3)"),
])
def test_public_plan_functions_check_their_arguments(call, needle):
    with pytest.raises(ValueError) as e:
        call()
    assert needle in str(e.value)


def test_a_valid_drtune_plan_is_unchanged_by_the_checks():
    g = torch.Generator().manual_seed(0)
    plan = methods.plan_drtune(10, 2, 4, g)
    assert len(plan.info["steps"]) == 2 and plan.info["stride"] == 5 and plan.stop == 10 - plan.info["t_min"] + 1
