import json

import pytest

from graspGPT.config import Config, ConfigError, build_parser, config_from_dict, flag_of, load_config


def write(tmp_path, data, name="cfg.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_defaults():
    cfg = load_config([])
    assert cfg == Config()
    assert cfg.trainer.batch_size == 24 and cfg.trainer.micro_batch_size == 6
    assert cfg.trainer.betas == (0.9, 0.95)
    assert cfg.model.model_type == "gpt2" and cfg.deepspeed.zero_stage is None
    assert cfg.dataset.data_path is None and cfg.wandb.enabled


def test_file_deep_merge_keeps_siblings(tmp_path):
    path = write(tmp_path, {"trainer": {"learning_rate": 1e-3, "betas": [0.8, 0.99]}, "wandb": {"mode": "offline"}})
    cfg = load_config(["--config", path])
    assert cfg.trainer.learning_rate == 1e-3
    assert cfg.trainer.betas == (0.8, 0.99) and isinstance(cfg.trainer.betas, tuple)
    assert cfg.trainer.batch_size == 24 and cfg.trainer.warmup_iters == 500  # siblings kept
    assert cfg.wandb.mode == "offline" and cfg.wandb.project == "graspGPT"


def test_flags_override_file(tmp_path):
    path = write(tmp_path, {"trainer": {"learning_rate": 1e-3, "max_iters": 50}, "system": {"seed": 1}})
    cfg = load_config(["--config", path, "--learning_rate", "5e-4", "--seed", "7", "--no_wandb",
                       "--data_path", "/d", "--output_dir", "/o", "--zero_stage", "3", "--local_rank=1"])
    assert cfg.trainer.learning_rate == 5e-4 and cfg.trainer.max_iters == 50
    assert cfg.system.seed == 7 and cfg.system.output_dir == "/o"
    assert cfg.wandb.enabled is False and cfg.dataset.data_path == "/d" and cfg.deepspeed.zero_stage == 3
    assert "local_rank" not in json.dumps(cfg.to_dict())


def test_every_flag_maps():
    argv = ["--resume", "r", "--batch_size", "8", "--micro_batch_size", "2", "--max_iters", "9",
            "--wandb_project", "p", "--deepspeed_config", "ds.json", "--model_type", "gpt-nano",
            "--max_sequence_length", "64", "--save_every", "3", "--log_every", "4", "--eval_every", "5",
            "--init_from", "w"]
    cfg = load_config(argv)
    t = cfg.trainer
    assert (t.resume, t.batch_size, t.micro_batch_size, t.max_iters) == ("r", 8, 2, 9)
    assert (t.save_every, t.log_every, t.eval_every, t.init_from) == (3, 4, 5, "w")
    assert cfg.wandb.project == "p" and cfg.deepspeed.config == "ds.json"
    assert cfg.model.model_type == "gpt-nano" and cfg.dataset.max_sequence_length == 64


# The flags users type (the guide's and the project's); generated from the config fields, they must not change.
FLAG_NAMES = {"--config", "--data_path", "--output_dir", "--resume", "--batch_size", "--micro_batch_size",
              "--learning_rate", "--max_iters", "--no_wandb", "--wandb_project", "--deepspeed_config", "--model_type",
              "--max_sequence_length", "--zero_stage", "--save_every", "--log_every", "--eval_every", "--seed",
              "--init_from", "--local_rank", "--help"}


def test_flags_come_from_the_fields_under_their_usual_names():
    assert {o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")} == FLAG_NAMES
    assert flag_of("trainer.micro_batch_size") == "--micro_batch_size" and flag_of("wandb.enabled") == "--no_wandb"
    assert flag_of("deepspeed.config") == "--deepspeed_config" and flag_of("trainer.min_lr") is None
    assert load_config(["--no_wandb"]).wandb.enabled is False and load_config([]).wandb.enabled is True


def test_unknown_key_suggests(tmp_path):
    path = write(tmp_path, {"trainer": {"learning_rat": 1e-3}})
    with pytest.raises(ConfigError, match=r"trainer\.learning_rat: unknown key in .*cfg\.json; did you mean trainer\.learning_rate\?"):
        load_config(["--config", path])
    with pytest.raises(ConfigError, match=r"traner: unknown section .*did you mean trainer\?"):
        load_config(["--config", write(tmp_path, {"traner": {}})])


def test_unknown_flag_suggests():
    with pytest.raises(ConfigError, match=r"unknown flag --learning_rat; did you mean --learning_rate\?"):
        load_config(["--learning_rat", "1e-3"])
    with pytest.raises(ConfigError, match=r"unknown flag --batchsize; did you mean --batch_size\?"):
        load_config(["--batchsize=3"])
    with pytest.raises(ConfigError, match="abbreviation|unknown flag --learn"):
        load_config(["--learn", "1e-3"])  # allow_abbrev=False
    with pytest.raises(ConfigError, match="invalid int value"):
        load_config(["--batch_size", "x"])


@pytest.mark.parametrize("section,key,value,expect", [
    ("trainer", "batch_size", "24", "an integer"),
    ("trainer", "batch_size", 2.5, "an integer"),
    ("trainer", "batch_size", True, "an integer"),
    ("trainer", "learning_rate", "fast", "a number"),
    ("trainer", "betas", [0.9], "a list of 2 numbers"),
    ("system", "deterministic", 1, "true or false"),
    ("dataset", "data_path", 3, "a string or null"),
])
def test_type_errors(tmp_path, section, key, value, expect):
    with pytest.raises(ConfigError, match=f"{section}.{key}: expected {expect}"):
        load_config(["--config", write(tmp_path, {section: {key: value}})])


def test_ints_accepted_for_floats_and_choices():
    cfg = config_from_dict({"trainer": {"learning_rate": 1, "min_lr": 0}})
    assert cfg.trainer.learning_rate == 1.0 and isinstance(cfg.trainer.learning_rate, float)
    with pytest.raises(ConfigError, match="trainer.lr_schedule: 'cosin' is not one of cosine, linear, constant"):
        config_from_dict({"trainer": {"lr_schedule": "cosin"}})
    with pytest.raises(ConfigError, match="dataset.real_filter_mode"):
        config_from_dict({"dataset": {"real_filter_mode": "all"}})
    with pytest.raises(ConfigError, match="dataset.grasp_order: 'shuffled' is not one of random, sorted"):
        config_from_dict({"dataset": {"grasp_order": "shuffled"}})
    with pytest.raises(ConfigError, match="dataset.train_grasps_per_object must be >= 0"):
        config_from_dict({"dataset": {"train_grasps_per_object": -1}})
    with pytest.raises(ConfigError, match="model.coordinate_init: 'fourier' is not one of sinusoidal, normal"):
        config_from_dict({"model": {"coordinate_init": "fourier"}})


def test_model_shape_rule(tmp_path):
    custom = {"model": {"model_type": None, "n_layer": 2, "n_head": 2, "n_embd": 32}}
    cfg = config_from_dict(custom)
    assert (cfg.model.model_type, cfg.model.n_layer) == (None, 2)
    with pytest.raises(ConfigError, match=r'set "model_type": null'):
        config_from_dict({"model": {"n_layer": 2, "n_head": 2, "n_embd": 32}})
    with pytest.raises(ConfigError, match="missing n_embd"):
        config_from_dict({"model": {"model_type": None, "n_layer": 2, "n_head": 2}})
    # --model_type on the command line replaces the file's custom shape
    cfg = load_config(["--config", write(tmp_path, custom), "--model_type", "gpt-mini"])
    assert (cfg.model.model_type, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == ("gpt-mini", None, None, None)


@pytest.mark.parametrize("d,match", [
    ({"trainer": {"batch_size": 0}}, "batch_size must be >= 1"),
    ({"trainer": {"micro_batch_size": 0}}, "micro_batch_size must be >= 1"),
    ({"trainer": {"learning_rate": 0}}, "learning_rate must be > 0"),
    ({"trainer": {"min_lr": 1e-3}}, "min_lr must be in"),
    ({"trainer": {"warmup_iters": -1}}, "warmup_iters must be >= 0"),
    ({"trainer": {"max_iters": 0}}, "max_iters must be >= 1"),
    ({"trainer": {"save_every": 0}}, "save_every must be >= 1"),
    ({"trainer": {"keep_last": 0}}, "keep_last must be >= 1"),
    ({"deepspeed": {"zero_stage": 4}}, "zero_stage must be 0, 1, 2 or 3"),
    ({"dataset": {"max_sequence_length": 15}}, "max_sequence_length must be >= 16"),
])
def test_range_errors(d, match):
    with pytest.raises(ConfigError, match=match):
        config_from_dict(d)


def test_cross_field_checked_after_flags(tmp_path):
    # min_lr > learning_rate in the file alone, fixed by the flag: only the final result counts
    path = write(tmp_path, {"trainer": {"learning_rate": 1e-5, "min_lr": 1e-4}})
    assert load_config(["--config", path, "--learning_rate", "1e-3"]).trainer.min_lr == 1e-4
    with pytest.raises(ConfigError, match="min_lr"):
        load_config(["--config", path])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "nope.json")])
    with pytest.raises(ConfigError, match="invalid JSON at line 2 column"):
        load_config(["--config", write(tmp_path, '{"trainer":\n {,}}')])
    with pytest.raises(ConfigError, match="expected a JSON object"):
        load_config(["--config", write(tmp_path, [1, 2])])
    with pytest.raises(ConfigError, match="trainer: expected an object"):
        load_config(["--config", write(tmp_path, {"trainer": 3})])


def test_save_round_trip(tmp_path):
    cfg = load_config(["--learning_rate", "3e-4", "--no_wandb", "--zero_stage", "1"])
    cfg.save(tmp_path / "run" / "config.json")
    back = config_from_dict(json.loads((tmp_path / "run" / "config.json").read_text()))
    assert back == cfg
    json.dumps(cfg.to_dict())  # serializable


def test_help_shows_dataclass_defaults():
    text = " ".join(build_parser().format_help().split())
    for fragment in ("--batch_size", "default: 24", "default: 0.0002", '"deepspeed_config.json"', "--no_wandb",
                     "default: 20000", "--local_rank"):
        assert fragment in text
