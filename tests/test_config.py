"""Config parsing: presets validate, unknown keys and bad values fail naming key and file."""

import re
from pathlib import Path

import pytest

from dusa_cli.config.loader import dump_config, load_config, parse_assignment
from dusa_cli.config.schema import ExperimentConfig
from dusa_cli.data.corruptions import CORRUPTIONS, EXTRA_CORRUPTIONS
from dusa_cli.errors import ConfigError

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_preset_validates_and_round_trips(path: Path, tmp_path: Path) -> None:
    config = load_config(path, {})
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(dump_config(config))
    assert load_config(dumped, {}) == config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = "model: {name: resnet18}\ndata: {root: d}\nmethod: {name: tent}\n"


def test_unknown_key_is_named_with_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "optim: {lrr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.lrr: unknown key"):
        load_config(path, {})


def test_unknown_method_and_method_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown method 'tentt'"):
        load_config(write(tmp_path, BASE.replace("tent", "tentt")), {})
    with pytest.raises(ConfigError, match=r"method\.alpha: unknown key"):
        load_config(write(tmp_path, BASE.replace("{name: tent}", "{name: tent, alpha: 1}")), {})


@pytest.mark.parametrize(("assignment", "problem"), [
    ("optim.lrr=0.1", "optim.lrr: unknown key, did you mean 'optim.lr'?"),
    ("data.batchsize=8", "data.batchsize: unknown key, did you mean 'data.batch_size'?"),  # the data section's own schema
    ("method.topkk=3", "method.topkk: unknown key, did you mean 'method.topk'?"),
    ("method.loss_weights.mze=1", "method.loss_weights.mze: unknown key, did you mean 'method.loss_weights.mse'?"),
    ("tsk=seg", "tsk: unknown key, did you mean 'task'?"),
    ("seed=3", "seed: unknown key, did you mean 'run.seed'?"),  # no close key here: the same key elsewhere
    ("run.lr=0.1", "run.lr: unknown key, did you mean 'optim.lr'?"),
    ("method.loss_weights.topk=3", "method.loss_weights.topk: unknown key, did you mean 'method.topk'?"),
    ("method.loss_weights={mse:0}", "method.loss_weights.mse:0: unknown key, did you mean 'method.loss_weights.mse'? (YAML needs a space after the colon: {mse: 0})"),
    ("method.lr=0.1", "method.lr: unknown key, did you mean 'optim.lr'?"),  # a section checked on its own, then the rest
    ("data.seed=3", "data.seed: unknown key, did you mean 'run.seed'?"),
    ("method.name=tnet", "method: unknown method 'tnet', did you mean 'tent'? (available: cotta, "),
    ("data.corruptions=gausian_noise", "data.corruptions: unknown corruption 'gausian_noise', did you mean 'gaussian_noise'? (choose from: all, "),
    ("data.corruptions=gausian", "data.corruptions: unknown corruption 'gausian', did you mean 'gaussian_blur' or 'gaussian_noise'? (choose"),
    ("run.compile.x=model", "run.compile.0: Input should be"),  # blamed on the command line, as set there
])  # fmt: skip
def test_a_mistyped_name_is_answered_with_the_closest_one(tmp_path: Path, assignment: str, problem: str) -> None:
    dusa = BASE.replace("{name: tent}", "{name: dusa, prior: sit_tiny, prior_random_init: true}")  # DUSA's options
    with pytest.raises(ConfigError, match=f"^command line: {re.escape(problem)}"):
        load_config(write(tmp_path, dusa if assignment.startswith("method.") else BASE), {}, [assignment])


def test_an_unknown_method_is_answered_with_the_methods_the_caller_runs(tmp_path: Path) -> None:
    """`dusa baseline --method sourc`: the guess and the list come from the registry, the
    methods with a prior (adapt-cls/adapt-seg) and those of another task left out."""
    from dusa_cli.methods import available_methods, get_method

    without_prior = [name for name in available_methods() if not get_method(name).uses_prior and "cls" in get_method(name).tasks]
    assert {"source", "tent"} <= set(without_prior) and "dusa" not in without_prior
    with pytest.raises(ConfigError, match=rf"^command line \(--method sourc\): method: unknown method 'sourc', did you mean 'source'\? \(available: {', '.join(without_prior)}\)$"):
        load_config(write(tmp_path, BASE), {"method.name": "sourc"}, runs=lambda method: not method.uses_prior)
    with pytest.raises(ConfigError, match=r"unknown method 'dus' \(available: "):  # dusa is adapt-cls's: no guess
        load_config(write(tmp_path, BASE), {"method.name": "dus"}, runs=lambda method: not method.uses_prior)
    with pytest.raises(ConfigError, match=r"unknown method 'tnet' \(available: dusa, dusa_u\)$"):  # a classification config
        load_config(write(tmp_path, BASE), {"method.name": "tnet"}, runs=lambda method: method.uses_prior)


def test_a_weights_file_from_the_command_line_replaces_the_presets_packaged_weights(tmp_path: Path) -> None:
    """--prior-checkpoint beside a preset's prior_pretrained: true (and --checkpoint beside
    model.pretrained: true): the file is what loads, and the run's config says so."""
    preset = Path(__file__).parents[1] / "configs" / "cls" / "dusa_digits.yaml"
    alone = load_config(preset, {})
    assert alone.method.prior_pretrained and alone.model.pretrained  # the preset's packaged weights
    given = load_config(preset, {"method.prior_checkpoint": "sit.pt", "model.checkpoint": "resnet.pth"})
    assert (given.method.prior_pretrained, given.method.prior_checkpoint.name) == (False, "sit.pt")
    assert (given.model.pretrained, given.model.checkpoint.name) == (False, "resnet.pth")
    assert not load_config(preset, {}, ["method.prior_checkpoint=sit.pt"]).method.prior_pretrained  # by --set too
    with pytest.raises(ConfigError, match=r"^--prior-checkpoint sit\.pt and --set method\.prior_pretrained=true both choose the weights: give one of them$"):
        load_config(preset, {"method.prior_checkpoint": "sit.pt"}, ["method.prior_pretrained=true"])


def test_a_name_close_to_none_gets_no_guess(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^command line: optim\.zzz: unknown key$"):
        load_config(write(tmp_path, BASE), {}, ["optim.zzz=1"])
    with pytest.raises(ConfigError, match=r"^command line: method: unknown method 'xyz' \(available: "):
        load_config(write(tmp_path, BASE), {}, ["method.name=xyz"])


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"), {})
    with pytest.raises(ConfigError, match="invalid YAML: could not convert string to float"):
        load_config(write(tmp_path, "optim: {lr: !!float abc}\n"), {})  # a tag that cannot build its value
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", {})
    with pytest.raises(ConfigError, match="is a folder: name the YAML file in it"):  # said "not found" before
        load_config(tmp_path, {})


def test_corruption_groups_and_unknown_names(tmp_path: Path) -> None:
    # The order the papers report them in (docs/research/dusa_official.md §4), spelled out.
    assert CORRUPTIONS == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
        "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
    )  # fmt: skip
    assert EXTRA_CORRUPTIONS == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    path = write(tmp_path, BASE)
    assert load_config(path, {"data.corruptions": ["all"]}).data.corruptions == list(CORRUPTIONS)
    assert load_config(path, {"data.corruptions": ["extra"]}).data.corruptions == list(EXTRA_CORRUPTIONS)
    both = load_config(path, {"data.corruptions": ["fog,snow", "fog"]}).data.corruptions
    assert both == ["fog", "snow"]
    with pytest.raises(ConfigError, match="unknown corruption 'fgo'"):
        load_config(path, {"data.corruptions": ["fgo"]})


def test_flag_and_set_overrides_take_precedence(tmp_path: Path) -> None:
    path = write(tmp_path, BASE + "optim: {lr: 0.1}\n")
    config = load_config(path, {"run.seed": 7, "data.severities": [3]}, ["optim.lr=1e-4", "run.setting=continual"])
    assert (config.run.seed, config.data.severities, config.optim.lr) == (7, [3], 1e-4)
    assert config.run.setting == "continual"
    with pytest.raises(ConfigError, match="severities"):
        load_config(path, {"data.severities": [6]})
    with pytest.raises(ConfigError, match="key.path=value"):
        parse_assignment("novalue")


def test_compile_mode_needs_something_to_compile(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    config = load_config(path, {}, ["run.compile=[prior]", "run.compile_mode=reduce-overhead"])
    assert config.run.compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match="compile_mode max-autotune has nothing to compile"):
        load_config(path, {}, ["run.compile_mode=max-autotune"])
    with pytest.raises(ConfigError, match="run.compile_mode"):
        load_config(path, {}, ["run.compile_mode=fastest"])


def test_switching_method_drops_the_presets_method_options(tmp_path: Path) -> None:
    preset = write(tmp_path, BASE.replace("method: {name: tent}", "method: {name: dusa, prior: sit_digits, topk: 3}"))
    for overrides, assignments in (({"method.name": "tent"}, []), ({}, ["method.name=tent"])):  # --method, --set
        config = load_config(preset, overrides, assignments)
        assert isinstance(config, ExperimentConfig) and config.method.name == "tent"
    assert load_config(preset, {}, ["method.name=dusa_u"]).method.topk == 3  # options both methods take stay


def test_segmentation_section_and_defaults(tmp_path: Path) -> None:
    seg = "task: seg\nmodel: {name: segformer}\ndata: {root: d}\nmethod: {name: tent}\n"
    config = load_config(write(tmp_path, seg), {})
    assert config.run.precision == "fp32" and config.data.short_side == 512 and config.data.batch_size == 1
    assert load_config(write(tmp_path, seg), {"method.name": "dusa_seg"}).run.precision == "bf16"  # an SD3-sized prior
    assert len(config.data.corruptions) == 15  # an omitted list means the 15 reported corruptions
    assert load_config(write(tmp_path, seg + "run: {precision: fp32}\n"), {"method.name": "dusa_seg"}).run.precision == "fp32"  # as said
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(write(tmp_path, seg), {"data.batch_size": 4})
    with pytest.raises(ConfigError, match="data.short_side: unknown key"):
        load_config(write(tmp_path, BASE), {"data.short_side": 256})  # a segmentation key in a cls config
    with pytest.raises(ConfigError, match="method 'dusa_seg' serves task seg, not cls"):
        load_config(write(tmp_path, BASE), {"method.name": "dusa_seg"})


def test_errors_blame_where_the_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^command line \(--corruption fgo\): data\.corruptions: unknown corruption 'fgo'"):
        load_config(write(tmp_path, BASE), {"data.corruptions": ["fgo"]})
    with pytest.raises(ConfigError, match=r"^command line: data\.batch_size: Input should be greater"):
        load_config(write(tmp_path, BASE), {}, ["data.batch_size=0"])  # nested config: no "Value error, data: …"
    path = write(tmp_path, BASE + "optim: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: optim\.lr"):
        load_config(path, {"run.seed": 3})
    with pytest.raises(ConfigError, match=r"c\.yaml with --seed -3: optim\.lr: .*; run\.seed"):
        load_config(path, {"run.seed": -3})


def test_an_error_that_a_flag_brings_about_in_the_file_names_the_flag(tmp_path: Path) -> None:
    """`--task seg` on a classification preset: the file's batch size is wrong only for
    segmentation, so the message names the file with the flag, not the file alone."""
    path = write(tmp_path, BASE + "data: {root: d, batch_size: 64}\nrun: {output: o}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} with --task seg: data\.batch_size: Input should be 1$"):
        load_config(path, {"task": "seg", "run.output": "elsewhere"})  # --output has nothing to do with it: not named
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))} with --set task=seg: data\.batch_size"):
        load_config(path, {}, ["task=seg"])
    eata = write(tmp_path, BASE.replace("tent", "eata"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(eata))} with --task seg: method 'eata' serves task cls, not seg"):
        load_config(eata, {"task": "seg"})
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: optim\.lrr: unknown key"):  # the file alone
        load_config(write(tmp_path, BASE + "optim: {lrr: 1}\n"), {"run.seed": 3})
    rotta = write(tmp_path, BASE.replace("tent", "rotta"))  # a whole-config check that names its key
    with pytest.raises(ConfigError, match=r"^command line: optim\.accumulation: method 'rotta' learns from whole batches"):
        load_config(rotta, {}, ["optim.accumulation=2"])


@pytest.mark.parametrize(("assignment", "problem"), [
    ("optim.lr=.inf", "optim.lr: Input should be a finite number"),
    ("optim.lr=nan", "optim.lr: Input should be a finite number"),
    ("optim.betas=[0.9,2.0]", "optim.betas.1: Input should be less than 1"),
    ("optim.lr=yes", "optim.lr: expected a number, got the boolean true \\(YAML reads yes/no and on/off as booleans too\\)$"),
    ("data.batch_size=true", "data.batch_size: expected an integer, got the boolean true"),  # YAML's yes is a boolean, not 1
    ("data.num_ex=yes", "data.num_ex: expected an integer, got the boolean true"),
    ("data.num_ex=abc", "data.num_ex: expected an integer, got 'abc'$"),
    ("data.num_ex=1.5", "data.num_ex: expected an integer, got 1.5$"),
    ("model.num_classes=false", "model.num_classes: expected an integer, got the boolean false"),
    ("model.num_classes=0", "model.num_classes: Input should be greater than or equal to 1"),
    ("optim.momentum=2", "optim.momentum: Input should be less than 1"),
    ("optim.accumulation=0", "optim.accumulation: Input should be greater than or equal to 1"),
    ("run.output=''", "run.output: expected a path, got an empty one"),
    ("data.root=", "data.root: expected a path, got an empty one"),  # YAML's null
    ("data=3", r"data: expected a section \(a mapping of its keys\), got 3$"),  # the location said once
    ("optim=3", r"optim: expected a section \(a mapping of its keys\), got 3$"),  # no class name
    ("method={}", r"method\.name is required \(--method\)$"),
    ("method=3", "method: expected a method name or a mapping with one"),
    ("data.severities=[5,true]", "data.severities: expected an integer, got the boolean true"),  # in a list too
    ("optim.betas=[0.9,yes]", "optim.betas: expected a number, got the boolean true"),
    ("data.severities=[]", "data.severities: no severity selected"),
    ("data.severities=[6]", "data.severities: severity must be one of 1..5, got 6"),
    ("data.corruptions=null", "data.corruptions: expected a corruption name or a list of them"),
    ("data.corruptions=5", "data.corruptions: unknown corruption '5'"),
    ("optim.lr=!!float abc", "optim.lr: expected a number, got '!!float abc'$"),  # taken as the text written
])  # fmt: skip
def test_values_no_optimizer_takes_are_config_errors(tmp_path: Path, assignment: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=f"^command line: {problem}"):
        load_config(write(tmp_path, BASE), {}, [assignment])


def test_a_missing_key_is_named_with_the_flag_that_gives_it(tmp_path: Path) -> None:
    """A missing section is named by the keys it lacks, in words, not pydantic's `Field required`."""
    with pytest.raises(ConfigError, match=r"^command line: model\.name is required \(--model\); data\.root is required \(--data\); "
                                          r"or start from a preset: -c configs/cls/digits\.yaml \(more in configs/\)$"):
        load_config(None, {"method.name": "source"})
    with pytest.raises(ConfigError, match=r"c\.yaml: data\.root is required \(--data\)$"):  # a preset: no preset to suggest
        load_config(write(tmp_path, "model: {name: resnet18}\ndata: {batch_size: 8}\nmethod: {name: tent}\n"), {})


def test_a_single_value_where_a_list_fits_is_a_list_of_one(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), {}, ["data.severities=3", "run.track=tensorboard", "run.compile=prior"])
    assert (config.data.severities, config.run.track, config.run.compile) == ([3], ["tensorboard"], ["prior"])
    seg = "task: seg\nmodel: {name: segformer}\ndata: {root: d}\nmethod: {name: dusa_seg}\n"
    dusa_seg = load_config(write(tmp_path, seg), {}, ["method.class_names=model"])
    assert dusa_seg.method.class_names == "model"  # a word this option accepts alone stays one
    assert load_config(write(tmp_path, BASE), {}, ["data.shuffle=no"]).data.shuffle is False  # booleans stay booleans


def test_local_paths_are_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's config.yaml names the same files from any working directory."""
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, BASE), {"model.checkpoint": "w/../w.pth", "run.output": "~/runs/a"})
    assert config.data.root == tmp_path / "d" and config.model.checkpoint == tmp_path / "w.pth"
    assert config.run.output == Path.home() / "runs" / "a"
    assert load_config(write(tmp_path, BASE), {}).run.output == tmp_path / "results" / "run"  # the default too
    dusa = load_config(write(tmp_path, BASE), {"method.name": "dusa"}, ["method.prior_checkpoint=p.pt", "method.vae=sd-vae"])
    assert dusa.method.prior_checkpoint == tmp_path / "p.pt" and dusa.method.vae == tmp_path / "sd-vae"
    assert load_config(write(tmp_path, BASE), {"method.name": "dusa"}).method.vae == "none"  # pixel space, not a path


def test_repeated_severities_are_one_task_and_seeds_are_63_bit(tmp_path: Path) -> None:
    path = write(tmp_path, BASE)
    assert load_config(path, {"data.severities": [5, 3, 5]}).data.severities == [5, 3]
    assert load_config(path, {"run.seed": 2**63 - 1}).run.seed == 2**63 - 1
    for seed in (-1, 2**63):
        with pytest.raises(ConfigError, match="run.seed"):
            load_config(path, {"run.seed": seed})


def test_the_readme_config_block_lists_every_key_with_its_default() -> None:
    """README's annotated config is the schema's defaults (with the required keys filled in): a
    key added to the schema, or a default changed, shows up there too."""
    import yaml

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(task: cls\n.*?)```", readme, re.S)
    assert block, "README has no config block starting with `task: cls`"
    documented = yaml.safe_load(block.group(1))
    required = {"model": {"name": documented["model"]["name"]}, "data": {"root": documented["data"]["root"]},
                "method": {"name": documented["method"]["name"]}}  # fmt: skip

    def flat(section: dict, prefix: str = "") -> dict:
        return {k: v for key, value in section.items()
                for k, v in (flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}).items()}  # fmt: skip

    defaults = flat(ExperimentConfig.model_validate(required).model_dump(mode="json"))
    written = flat(ExperimentConfig.model_validate(documented).model_dump(mode="json"))
    assert sorted(flat(documented)) == sorted(defaults)  # every key, no other
    assert written == defaults


def test_a_timestep_range_over_a_preset_s_timestep_says_how_to_drop_it(tmp_path: Path) -> None:
    dusa = BASE.replace("{name: tent}", "{name: dusa, prior: sit_tiny, prior_random_init: true, timestep: 0.25}")
    with pytest.raises(ConfigError, match=re.escape("not both (to replace a preset's timestep: --set method.timestep=null)")):
        load_config(write(tmp_path, dusa), {}, ["method.timestep_range=[0.5,0.9]"])
    assert load_config(write(tmp_path, dusa), {}, ["method.timestep_range=[0.5,0.9]", "method.timestep=null"]).method.timestep_range == (0.5, 0.9)
