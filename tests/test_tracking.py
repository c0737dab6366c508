"""log.trackers: TensorBoard, MLflow and W&B (offline), read back with each library's own reader,
across a resume; under `rayreward tune` in test_tune; bad tracker settings."""

import glob
import json
import os

import pytest
from helpers import quick_cfg, rows

from rayreward import config, runfolder, tracking, train

ALL = "log.trackers=[tensorboard, mlflow, wandb]"


def tensorboard_scalars(folder) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """{tag: [(step, value)]} and the image tags of the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}, tags["images"]


def wandb_records(run_file) -> dict[str, list]:
    """The records of an offline W&B run file, by kind (history rows as {key: value})."""
    from wandb.proto import wandb_internal_pb2 as pb
    from wandb.sdk.internal import datastore

    ds = datastore.DataStore()
    ds.open_for_scan(run_file)
    out: dict[str, list] = {}
    while (data := ds.scan_data()) is not None:
        r = pb.Record()
        r.ParseFromString(data)
        kind = r.WhichOneof("record_type")
        if kind == "history":
            item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        elif kind == "run":
            item = {i.key: json.loads(i.value_json) for i in r.run.config.update}
        else:
            item = r
        out.setdefault(kind, []).append(item)
    return out


def test_a_run_and_its_resume_are_one_tracked_run_in_each_tracker(tmp_path):
    import mlflow

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    saved = {}
    keep = lambda row, folder: folder and saved.update(r=runfolder.read_checkpoint(folder))  # noqa: E731
    train.run_training(quick_cfg(tmp_path, ALL), report=keep)
    assert saved["r"].step == 2
    first_ids = json.loads((tmp_path / tracking.STATE_FILE).read_text())
    train.run_training(quick_cfg(tmp_path, ALL, "train.steps=4"), resume=saved["r"], report=keep)
    log = rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in log] == [0, 1, 2, 3]

    # TensorBoard: one curve per metrics.csv column, steps 0..3 once each; both grids as images
    scalars, images = tensorboard_scalars(tmp_path / "tensorboard")
    assert [s for s, _ in scalars["reward_mean"]] == [0, 1, 2, 3]
    assert [v for _, v in scalars["reward_mean"]] == pytest.approx([float(r["reward_mean"]) for r in log], rel=1e-6)
    for tag in ("loss", "grad_norm", "reward/symmetry", "s_sample", "unet_calls_total", "grid/end/symmetry"):
        assert tag in scalars, tag
    assert set(images) == {"grid/start", "grid/end"}

    # MLflow: the resume continued the first run (same id), params = the resolved config; the
    # store's URI did not leak into this process's environment (a later run would inherit it)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before
    ids = json.loads((tmp_path / tracking.STATE_FILE).read_text())
    assert ids["mlflow"] == first_ids["mlflow"]
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")  # log.experiment "" = the run's name
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [ids["mlflow"]] and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["method.name"] == "drtune" and run.data.params["optim.lr"] == "0.01"
    assert run.data.params["lora.target_modules"].startswith("[to_q, to_k")
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert sorted(h.step for h in history) == [0, 1, 2, 3]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "lora")}
    assert {"lora/pytorch_lora_weights.safetensors", "lora/README.md"} <= arts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "grids")} == {"grids/grid_start.png",
                                                                                  "grids/grid_end.png"}

    # W&B, offline (no key here): each run folder holds the id kept in trackers.json
    assert ids["wandb"] == first_ids["wandb"]
    files = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / f"run-{ids['wandb']}.wandb")))
    assert len(files) == 2  # the first run and the resume, `wandb sync` uploads both into one run
    recs = [wandb_records(f) for f in files]
    steps = [h["_step"] for r in recs for h in r["history"] if "reward_mean" in h]
    assert steps == [0, 1, 2, 3]
    assert recs[0]["run"][0]["method.name"] == "drtune"
    images = [h[k] for r in recs for h in r["history"] for k in h if k.endswith("/_type")]
    assert images == ["image-file"] * 3  # grid/start at step 0, grid/end at each run's end
    assert any("grid/start/path" in h for h in recs[0]["history"])
    assert any("grid/end/path" in h for h in recs[1]["history"])
    assert "artifact" in recs[1]  # the LoRA, queued for `wandb sync`


def test_no_trackers_by_default_writes_none_of_their_files(tmp_path):
    train.run_training(quick_cfg(tmp_path, "train.steps=1"))
    for name in ("tensorboard", "mlflow.db", "wandb", tracking.STATE_FILE, "mlartifacts"):
        assert not (tmp_path / name).exists(), name


def test_bad_tracker_settings_are_refused_naming_the_field(tmp_path, monkeypatch):
    def problems(*sets):
        with pytest.raises(config.ConfigError) as e:
            quick_cfg(tmp_path, *sets)
        return "\n".join(e.value.problems)

    assert "log.trackers[1]: 'comet' is unknown; allowed: tensorboard, mlflow, wandb" in problems(
        "log.trackers=[mlflow, comet]")
    assert "log.wandb_mode: 'sometimes' is unknown; allowed: auto, online, offline" in problems(
        "log.wandb_mode=sometimes")
    monkeypatch.setattr(config, "_importable", lambda module: module != "wandb")
    assert ("log.trackers[0]: wandb needs the 'wandb' package, which is not installed; "
            'pip install -c constraints.txt -e ".[wandb]"') in problems("log.trackers=[wandb]")
    assert not (tmp_path / "metrics.csv").exists()


def test_the_mlflow_uri_and_wandb_mode_follow_the_config_then_the_environment(tmp_path, monkeypatch):
    cfg = quick_cfg(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.mlflow_uri(cfg) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking.mlflow_uri(cfg) == "http://mlflow.internal:5000"
    cfg.log.mlflow_tracking_uri = "sqlite:////data/all.db"
    assert tracking.mlflow_uri(cfg) == "sqlite:////data/all.db"

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no `wandb login` here
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    assert tracking.wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode(cfg) == "online"
    cfg.log.wandb_mode = "offline"
    assert tracking.wandb_mode(cfg) == "offline"


def test_an_unreadable_trackers_file_starts_new_tracked_runs_with_a_warning(tmp_path, capsys):
    path = tmp_path / tracking.STATE_FILE
    for damaged in ("{not json", "[1, 2]", '{"mlflow": 3}'):
        path.write_text(damaged)
        assert tracking.read_ids(path) == {}
        assert "trackers.json is unreadable; the trackers start new runs" in capsys.readouterr().out
    path.write_text('{"mlflow": "abc", "wandb": "xyz"}')
    assert tracking.read_ids(path) == {"mlflow": "abc", "wandb": "xyz"}
    assert tracking.read_ids(tmp_path / "missing.json") == {}
