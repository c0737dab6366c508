"""The driver's contract with Ray's internals, and the one error model the CLI reads."""

import importlib
import inspect
import logging
import signal

import pytest

from rayreward import cli, driver, errors


def _resolve(target: str):
    module, _, attr = target.partition(":")
    obj = importlib.import_module(module)
    if attr == "logger":
        return obj
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("target", sorted(driver.PRIVATE_RAY))
def test_every_private_ray_api_the_driver_uses_is_where_it_was(target):
    """Fails loudly when a Ray upgrade moves one of them (checked against driver.RAY_CHECKED):
    the message says which, and what rayreward loses until it is followed."""
    try:
        obj = _resolve(target)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"Ray moved {target} (checked against Ray {driver.RAY_CHECKED}): {e}; rayreward loses: "
                    f"{driver.PRIVATE_RAY[target]}. Update rayreward/driver.py")
    assert obj is not None


def test_the_private_apis_have_the_shape_the_driver_relies_on():
    from ray._private.worker import global_worker_stdstream_dispatcher as dispatcher
    from ray.train.torch import TorchTrainer

    assert list(inspect.signature(TorchTrainer._register_sigint_handler).parameters) == ["self", "controller"]
    assert hasattr(dispatcher, "_lock") and isinstance(dispatcher.handlers, list)
    assert callable(dispatcher.remove_handler)
    assert "ignore_prefix" in inspect.signature(_resolve("ray._private.worker:print_to_stdstream")).parameters
    # the driver's Trainer overrides the hook Ray Train calls
    assert driver.Trainer._register_sigint_handler is not TorchTrainer._register_sigint_handler
    # the loggers are real modules' loggers (a renamed module would make the name a dead one)
    for name in (driver.TRAIN_UTIL_LOGGER, driver.TOKEN_NOTICE_LOGGER):
        importlib.import_module(name)
        assert isinstance(logging.getLogger(name), logging.Logger)


def test_every_user_facing_error_has_one_of_the_two_bases_and_the_cli_maps_them():
    usage = [errors.ConfigError(["x: bad"]), errors.ModelLoadError("m"), errors.LoraFileError("l"),
             errors.RewardLoadError("r"), errors.CheckpointError("c"), errors.RunFolderBusy("b")]
    run = [errors.ClusterError("c"), errors.RewardGradientError("g"), errors.SweepError("s")]
    for e in usage:
        assert isinstance(e, errors.UsageError) and not isinstance(e, errors.RunError)
        assert cli.explain(e)[1] == 2
    for e in run:
        assert isinstance(e, errors.RunError) and not isinstance(e, errors.UsageError)
        assert cli.explain(e) == (str(e), 1)
    # a class defined anywhere picks its exit code by its base alone
    class NewKind(errors.UsageError):
        pass

    assert cli.explain(NewKind("a new kind of bad input")) == ("a new kind of bad input", 2)
    message, code = cli.explain(ZeroDivisionError("boom"))
    assert code == 1 and "please report it" in message


def test_the_error_classes_are_defined_in_errors_only():
    """One home: the modules that raise them import them from rayreward.errors."""
    import ast
    from pathlib import Path

    pkg = Path(errors.__file__).parent
    defined = {}
    for f in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and any(getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception"))
                                                      for b in node.bases):
                defined.setdefault(node.name, []).append(f.relative_to(pkg).as_posix())
    assert {name: files for name, files in defined.items() if files != ["errors.py"]} == {}


def test_interrupted_survives_a_ray_boundary_and_names_its_signal():
    import pickle

    e = pickle.loads(pickle.dumps(errors.Interrupted(signal.SIGTERM)))
    assert e.signum == signal.SIGTERM and str(e) == "SIGTERM"
    assert not isinstance(e, Exception)  # no `except Exception` on the way swallows it


def test_the_config_travels_to_the_workers_as_data(tmp_path):
    """prepare_run copies the parsed config (no re-parse): the copy is a Config, with an absolute
    output_dir and the prompts read on the driver; the caller's config is untouched."""
    from rayreward import config

    cfg = config.from_dict({"prompt_file": "builtin:animals", "output_dir": "runs/x"})
    run = driver.prepare_run(cfg)
    assert isinstance(run, config.Config) and run is not cfg
    assert run.output_dir.startswith("/") and run.prompt_file is None and run.prompts == cfg.training_prompts()
    assert cfg.prompt_file == "builtin:animals" and cfg.output_dir == "runs/x"
