"""Run settings are checked when made, a run folder is never silently overwritten, and the config file and the
command line combine in the documented order; evaluation and training check their data before any work."""

import math

import numpy as np
import pytest
import yaml

import gigaseg.api
from gigaseg.api import evaluate, train
from gigaseg.cli import main
from gigaseg.errors import ConfigError, DatasetError
from gigaseg.io.normalize import Normalization
from gigaseg.methods.registry import create_model
from gigaseg.training.checkpoint import save_checkpoint
from gigaseg.training.recipe import TrainSettings

OPTIONS = {"input_size": 64}


def one_line_cli_error(capsys, argv, *fragments):
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


# --------------------------------------------------------------------------- 2. TrainSettings


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("epochs", 0, "epochs (--epochs) must be"),
        ("epochs", -3, "epochs (--epochs) must be"),
        ("epochs", 2.5, "epochs (--epochs) must be"),
        ("batch_size", 0, "batch_size (--batch-size) must be"),
        ("lr", 0.0, "lr (--lr) must be"),
        ("lr", -1e-3, "lr (--lr) must be"),
        ("lr", math.nan, "lr (--lr) must be"),
        ("lr", math.inf, "lr (--lr) must be"),
        ("lr", "fast", "lr (--lr) must be"),
        ("accumulate", 0, "accumulate (--accumulate) must be"),
        ("num_nodes", 0, "num_nodes (--num-nodes) must be"),
        ("num_workers", -1, "num_workers (--workers) must be"),
        ("seed", 1.5, "seed (--seed) must be"),
        ("seed", "7", "seed (--seed) must be"),
        ("seed", -1, "seed (--seed) must be"),
        ("seed", True, "seed (--seed) must be"),
        ("val_block_size", 0, "val_block_size must be"),
        ("val_block_size", 100, "val_block_size must be"),
        ("max_val_images", 0, "max_val_images must be"),
        ("max_memory", 0, "max_memory (--max-memory) must be"),
        ("max_memory", -5, "max_memory (--max-memory) must be"),
        ("precision", "16", None),  # an alias Fabric accepts: fine
        ("precision", "fp8", "precision (--precision) must be one of"),
        ("precision", "32 ", "precision (--precision) must be one of"),
    ],
)
def test_train_settings_are_validated_at_construction(field, value, fragment):
    if fragment is None:
        TrainSettings(**{field: value})
        return
    with pytest.raises(ConfigError) as caught:
        TrainSettings(**{field: value})
    assert fragment in str(caught.value) and len(str(caught.value).splitlines()) == 1


def test_train_settings_accept_none_and_read_sizes_and_yaml_number_strings():
    s = TrainSettings(epochs=None, max_val_images=None, max_memory="2GB", lr="1e-3", precision=16)
    assert s.max_memory == 2 * 10**9 and s.lr == pytest.approx(1e-3) and s.precision == "16"


def test_precisions_are_the_ones_lightning_fabric_accepts():
    import typing

    from lightning_fabric.plugins.precision import precision

    from gigaseg.training.recipe import PRECISIONS

    fabric = {str(v) for kind in typing.get_args(precision._PRECISION_INPUT) for v in typing.get_args(kind)}
    assert set(PRECISIONS) == fabric


def test_cli_epochs_0_and_accumulate_0_are_one_line_config_errors(capsys, tiny_dataset, tmp_path):
    base = [
        "train",
        "--method",
        "global",
        "--data",
        tiny_dataset,
        "--out",
        tmp_path / "run",
        "--encoder",
        "test_resnet",
    ]
    one_line_cli_error(capsys, [*base, "--epochs", "0"], "--epochs")
    one_line_cli_error(capsys, [*base, "--accumulate", "0"], "--accumulate")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- 3. existing run folders


@pytest.mark.parametrize("name", ["last.ckpt", "best.ckpt", "config.yaml"])
def test_training_into_a_folder_holding_a_run_is_refused_without_resume_or_force(tiny_dataset, tmp_path, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text("the previous run")
    with pytest.raises(ConfigError) as caught:
        train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=TrainSettings(epochs=1))
    message = str(caught.value)
    assert str(run) in message and name in message and "resume" in message and "force" in message
    assert len(message.splitlines()) == 1
    assert (run / name).read_text() == "the previous run"


def test_force_trains_over_an_existing_run(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("the previous run")
    settings = TrainSettings(epochs=1, batch_size=2, progress=False)
    train("global", tiny_dataset, run, encoder="test_resnet", options=OPTIONS, settings=settings, force=True)
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["method"] == "global"


def test_cli_refuses_an_existing_run_and_names_resume_and_force(capsys, tiny_dataset, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.ckpt").write_text("the previous run")
    argv = ["train", "--method", "global", "--data", tiny_dataset, "--out", run, "--encoder", "test_resnet"]
    one_line_cli_error(capsys, argv, "last.ckpt", "--resume", "--force")
    seen = {}
    monkeypatch.setattr(gigaseg.api, "train", lambda *a, **kw: seen.update(kw) or {"history": []})
    assert main([str(a) for a in [*argv, "--force"]]) == 0
    assert seen["force"] is True and seen["resume"] is False


# --------------------------------------------------------------------------- 6. config file vs command line


def test_cli_flags_given_explicitly_override_the_config_file_and_the_file_overrides_defaults(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "settings": {
                    "seed": 3,
                    "num_workers": 2,
                    "accelerator": "cpu",
                    "devices": 2,
                    "num_nodes": 2,
                    "strategy": "ddp",
                    "precision": "bf16-mixed",
                    "accumulate": 4,
                    "epochs": 5,
                }
            }
        )
    )
    seen = {}
    monkeypatch.setattr(gigaseg.api, "train", lambda *a, **kw: seen.update(kw) or {"history": []})
    argv = ["train", "--method", "global", "--data", tmp_path, "--out", tmp_path / "run", "--config", config]

    assert main([str(a) for a in argv]) == 0
    s = seen["settings"]
    assert (s.seed, s.num_workers, s.accelerator, s.devices, s.num_nodes) == (3, 2, "cpu", 2, 2)
    assert (s.strategy, s.precision, s.accumulate, s.epochs) == ("ddp", "bf16-mixed", 4, 5)

    # flags given explicitly win, even when they equal the defaults
    explicit = ["--seed", "0", "--workers", "0", "--accelerator", "auto", "--devices", "1", "--num-nodes", "1"]
    explicit += ["--strategy", "auto", "--precision", "32-true", "--accumulate", "1", "--epochs", "2"]
    assert main([str(a) for a in argv + explicit]) == 0
    s = seen["settings"]
    assert (s.seed, s.num_workers, s.accelerator, s.devices, s.num_nodes) == (0, 0, "auto", 1, 1)
    assert (s.strategy, s.precision, s.accumulate, s.epochs) == ("auto", "32-true", 1, 2)

    # without a config file the defaults apply
    assert main([str(a) for a in argv[:-2]]) == 0
    assert seen["settings"] == TrainSettings()


def test_cli_config_file_with_bad_settings_names_the_file(capsys, tmp_path):
    config = tmp_path / "config.yaml"
    argv = ["train", "--method", "global", "--data", tmp_path, "--out", tmp_path / "run", "--config", config]
    config.write_text(yaml.safe_dump({"settings": {"epoch": 3}}))
    one_line_cli_error(capsys, argv, "config.yaml", "'epoch'")
    config.write_text(yaml.safe_dump({"settings": {"accumulate": 0}}))
    one_line_cli_error(capsys, argv, "config.yaml", "accumulate")
    config.write_text(yaml.safe_dump({"settings": [1, 2]}))
    one_line_cli_error(capsys, argv, "config.yaml", "settings")


# --------------------------------------------------------------------------- 7. empty training split


def test_train_with_an_empty_training_split_is_a_dataset_error(tiny_dataset, tmp_path, monkeypatch):
    import gigaseg.data.loader

    real = gigaseg.data.loader.load_dataset

    class Empty:
        classes, palette, ignore_index = ["a", "b"], [[0, 0, 0], [1, 1, 1]], 255

        def __len__(self):
            return 0

        def __getitem__(self, index):
            raise IndexError(index)

    monkeypatch.setattr(
        gigaseg.data.loader,
        "load_dataset",
        lambda data, split, **kw: Empty() if split == "train" else real(data, split),
    )
    with pytest.raises(DatasetError, match=r"the 'train' split has no images"):
        train("global", tiny_dataset, tmp_path / "run", encoder="test_resnet", options=OPTIONS)


# --------------------------------------------------------------------------- 4. evaluate checks up front


def checkpoint_of(tmp_path, num_classes=3, in_channels=3, method="global", **options):
    model = create_model(method, encoder="test_resnet", num_classes=num_classes, in_channels=in_channels, **options)
    data = {
        "classes": [f"c{i}" for i in range(num_classes)],
        "palette": [[i, i, i] for i in range(num_classes)],
        "ignore_index": 255,
        "exclude_from_miou": [],
        "normalization": Normalization.for_image(in_channels, np.uint8).to_dict(),
    }
    return save_checkpoint(tmp_path / f"model{num_classes}x{in_channels}.ckpt", model, data)


@pytest.fixture
def predictions(monkeypatch):
    """Counts the images evaluate predicts (it must predict none when the data does not fit the model)."""
    import gigaseg.inference.stream

    calls = []
    real = gigaseg.inference.stream.predict_image
    monkeypatch.setattr(gigaseg.inference.stream, "predict_image", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_evaluate_checks_class_count_before_predicting_any_image(tiny_dataset, tmp_path, predictions):
    ckpt = checkpoint_of(tmp_path, num_classes=2, input_size=32)
    with pytest.raises(ConfigError) as caught:
        evaluate(ckpt, tiny_dataset, split="train", progress=False)
    message = str(caught.value)
    assert str(tiny_dataset) in message and "3 classes" in message and "2" in message, message
    assert len(message.splitlines()) == 1
    assert predictions == []


def test_evaluate_checks_channels_before_predicting_any_image(tiny_dataset, tmp_path, predictions):
    ckpt = checkpoint_of(tmp_path, num_classes=3, in_channels=4, input_size=32)
    with pytest.raises(ConfigError) as caught:
        evaluate(ckpt, tiny_dataset, split="train", progress=False)
    message = str(caught.value)
    assert "3 channels" in message and "4" in message, message
    assert predictions == []


def test_cli_evaluate_with_another_class_count_is_a_one_line_error(capsys, tiny_dataset, tmp_path, predictions):
    ckpt = checkpoint_of(tmp_path, num_classes=2, input_size=32)
    one_line_cli_error(capsys, ["evaluate", "--checkpoint", ckpt, "--data", tiny_dataset], "3 classes")
    assert predictions == []


def test_evaluate_with_matching_data_still_scores(tiny_dataset, tmp_path):
    ckpt = checkpoint_of(tmp_path, num_classes=3, input_size=32)
    summary = evaluate(ckpt, tiny_dataset, split="val", progress=False)
    assert 0.0 <= summary["miou"] <= 1.0


def test_train_checks_the_validation_split_matches_the_training_split(tiny_dataset, tmp_path):
    import tifffile

    name = yaml.safe_load((tiny_dataset / "dataset.yaml").read_text())["splits"]["val"][0]
    image = tiny_dataset / "images" / f"{name}.tif"
    tifffile.imwrite(image, np.zeros((96, 96), np.uint8), tile=(32, 32))  # a grey image in the RGB dataset
    with pytest.raises(DatasetError, match=rf"{name}\.tif: .*1 channel.* 3 channels"):
        train("global", tiny_dataset, tmp_path / "run", encoder="test_resnet", options=OPTIONS)
    assert not (tmp_path / "run" / "config.yaml").exists()
