import re

import pytest
import yaml

from tests.helpers import ROOT, tiny_dict
from workflow.core.config import ConfigError, Params, Paths, load_params, params_from_dict, paths_of


def test_shipped_params_are_the_documented_defaults():
    assert load_params(ROOT / "params.yaml") == Params()


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_presets_validate(preset):
    params = load_params(preset)
    assert params.data.resolution % 2 ** (len(params.model.block_out_channels) - 1) == 0


def test_bare_no_written_by_dvc_means_no():
    assert params_from_dict(yaml.safe_load("train: {mixed_precision: no}")).train.mixed_precision == "no"


def test_values_are_typed():
    p = params_from_dict(tiny_dict(train={"learning_rate": "1e-4"}))  # YAML 1.1 reads 1e-4 as a string
    assert p.train.learning_rate == 1e-4 and isinstance(p.model.block_out_channels, tuple)


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"trian": {}}, ["unknown key `trian`", "train"]),
        ({"train": {"lr": 1}}, ["unknown key `train.lr`", "learning_rate"]),
        ({"train": {"batch_size": 0}}, ["`train.batch_size`", "> 0"]),
        ({"train": {"batch_size": 2.5}}, ["`train.batch_size`", "int"]),
        ({"train": {"ema": "yes"}}, ["`train.ema`", "bool"]),
        ({"train": {"mixed_precision": "fp8"}}, ["`train.mixed_precision`", "'bf16'"]),
        ({"data": {"channels": 2}}, ["`data.channels`", "1, 3"]),
        ({"data": {"source": "s3://bucket"}}, ["`data.source`", "imagefolder:<path>"]),
        ({"data": {"source": "hf:butterflies"}}, ["hf:<owner>/<name>"]),
        ({"data": {"resolution": 9}}, ["`data.resolution`", "divisible"]),
        ({"model": {"attention_levels": [5]}}, ["`model.attention_levels`"]),
        ({"model": {"block_out_channels": [12, 32]}}, ["norm_num_groups"]),
        ({"sample": {"grid_size": 3}}, ["`sample.grid_size`", "`fid.num_samples`"]),
        ({"sample": {"sampler": "dpm"}}, ["`sample.sampler`", "'dpmsolver++'"]),
        ({"sample": {"eta": 1.5}}, ["`sample.eta`", "[0, 1]"]),
        ({"sample": {"timestep_spacing": "trailng"}}, ["`sample.timestep_spacing`", "'trailing'"]),
        ({"fid": {"steps_sweep": [10, 0]}}, ["`fid.steps_sweep`", "> 0"]),
        ({"fid": {"weights_sha256": "abc"}}, ["`fid.weights_sha256`", "hex"]),
        ({"model": {"block_out_channels": "32"}}, ["`model.block_out_channels`", "list"]),
        ({"train": [1, 2]}, ["`train` must be a mapping"]),
    ],
)
def test_mistakes_name_the_key_and_the_rule(raw, words):
    merged = tiny_dict()
    for section, value in raw.items():
        merged[section] = {**merged.get(section, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError) as err:
        params_from_dict(merged)
    for word in words:
        assert word in str(err.value)


def test_load_params_reports_the_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="p.yaml: not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="no such file"):
        load_params(tmp_path / "missing.yaml")


def test_cli_prints_one_clear_line(tmp_path, capsys):
    from workflow.__main__ import main

    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"train": {"learning_rate": -1}}))
    assert main(["train", "--params", str(tmp_path / "p.yaml")]) == 1
    assert "`train.learning_rate` must be > 0" in capsys.readouterr().err
    assert main(["nonsense"]) == 2


def test_paths_of_another_runs_params_takes_defaults_and_ignores_the_rest():
    """An experiment's params.yaml from older or newer code still locates its artifacts."""
    paths = paths_of({"paths": {"grid": "out/grid.png", "renamed_later": "x"}, "train": {"unknown": 1}})
    assert paths.grid == "out/grid.png" and paths.metrics == Paths().metrics
    assert paths_of({}) == Paths()


def numeric_keys(cls=Params, prefix=""):
    """(dotted key, type hint) of every number and list of numbers in params (bools and choices aside)."""
    import dataclasses
    import typing

    for name, hint in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(hint):
            yield from numeric_keys(hint, f"{prefix}{name}.")
            continue
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        kind = typing.get_args(inner[0])[0] if typing.get_origin(inner[0]) is tuple else inner[0]
        if kind in (int, float):
            yield prefix + name, inner[0]


@pytest.mark.parametrize("key", [k for k, _ in numeric_keys()])
def test_every_number_has_an_upper_bound(key):
    """A huge value (an extra zero or six) is one error naming the key, never a stage that runs without end."""
    hint = dict(numeric_keys())[key]
    huge = [10**13] if str(hint).startswith("tuple") else 10**13
    section, _, leaf = key.rpartition(".")
    raw = tiny_dict(**({section: {leaf: huge}} if section else {leaf: huge}))
    with pytest.raises(ConfigError, match=f"`{re.escape(key)}"):
        params_from_dict(raw)


def test_a_million_layers_is_refused_at_once():
    """The value that made tests/test_config_fuzz.py build modules for 7 minutes at 12 GB (issue 18)."""
    with pytest.raises(ConfigError, match=r"`model.layers_per_block` must be > 0 and <= 16, got 1000000"):
        params_from_dict(tiny_dict(model={"layers_per_block": 1000000}))


def test_readme_lists_the_upper_bounds():
    """The README's "Upper bounds" table is the bounds config.py enforces, key for key."""
    import dataclasses

    def bounds(cls, prefix=""):
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
                yield from bounds(f.default_factory, f"{prefix}{f.name}.")
            elif "max" in f.metadata:
                yield prefix + f.name, f.metadata["max"]

    section = (ROOT / "README.md").read_text().split("### Upper bounds", 1)[1].split("\n#", 1)[0]
    documented = {}
    for bound, keys in re.findall(r"^\| ([\d,]+) \| (.+) \|$", section, flags=re.M):
        documented.update({key: int(bound.replace(",", "")) for key in re.findall(r"`([a-z_.]+)`", keys)})
    assert documented == dict(bounds(Params))


def test_fid_needs_two_samples():
    """A covariance of one sample is undefined: refused here, not by evaluate after sampling."""
    with pytest.raises(ConfigError, match=r"`fid.num_samples` must be >= 2 and <= 100,000, got 1"):
        params_from_dict(tiny_dict(fid={"num_samples": 1}, sample={"grid_size": 1}))


def test_sampling_steps_within_the_training_schedule():
    with pytest.raises(ConfigError, match=r"`sample.num_inference_steps`.*`scheduler.num_train_timesteps` \(100\)"):
        params_from_dict(tiny_dict(scheduler={"num_train_timesteps": 100}, sample={"num_inference_steps": 101}))
    with pytest.raises(ConfigError, match=r"`fid.steps_sweep` \(\[2000\]\)"):
        params_from_dict(tiny_dict(fid={"steps_sweep": [10, 2000]}))


@pytest.mark.parametrize(
    "section, folder, paths, words",
    [
        ("data", "data/raw/photos", {}, "`data.folder` ('data/raw/photos') is inside `paths.raw` ('data/raw')"),
        ("data", "data/raw", {}, "`data.folder` ('data/raw') is `paths.raw` ('data/raw')"),
        ("data", "./data/images/../raw//x/", {}, "`data.folder` ('./data/images/../raw//x/') is inside `paths.raw`"),
        ("data", "data/processed/latents/mine", {}, "is inside `paths.latents` ('data/processed/latents')"),
        ("data", "photos/in", {"samples": "photos"}, "`data.folder` ('photos/in') is inside `paths.samples`"),
        ("model", "models/base", {}, "`model.folder` ('models/base') is `paths.base_model` ('models/base')"),
        ("model", "models/base/sd", {}, "`model.folder` ('models/base/sd') is inside `paths.base_model`"),
        ("model", "models/trained", {}, "`model.folder` ('models/trained') is `paths.trained`"),
    ],
)
def test_a_source_folder_in_an_output_is_refused_naming_both_keys(section, folder, paths, words):
    """The stage writing that output replaces it whole: the user's folder would be deleted with it."""
    source = {"source": f"imagefolder:{folder}"} if section == "data" else {}  # dvc tracks model.folder always
    raw = tiny_dict(**{section: {**source, "folder": folder}}, paths=paths)
    with pytest.raises(ConfigError, match="whole: the folder would be deleted") as error:
        params_from_dict(raw)
    assert words in str(error.value)


def test_a_source_folder_beside_the_outputs_is_accepted():
    """Only containment counts: `data/raw2` shares a prefix with `data/raw` but is not inside it."""
    for folder in ("data/raw2", "data/images", "photos"):
        assert params_from_dict(tiny_dict(data={"folder": folder})).data.folder == folder


@pytest.mark.parametrize("folder, holds", [("data", "paths.raw"), (".", "paths.raw"), ("reports", "paths.train_log")])
def test_a_source_folder_holding_an_output_is_refused(folder, holds):
    """`imagefolder:data` would read the pipeline's own outputs (data/samples' PNGs) as training images."""
    with pytest.raises(ConfigError, match=rf"`data.folder` \('{re.escape(folder)}'\) holds `{holds}`"):
        params_from_dict(tiny_dict(data={"folder": folder}))
    assert params_from_dict(tiny_dict(model={"folder": "models/base2"})).model.folder == "models/base2"


def test_a_source_folder_reached_through_a_link_into_an_output_is_refused(tmp_path):
    """Paths are compared resolved: a link to `paths.raw`'s folder is that folder."""
    (tmp_path / "raw").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "raw")
    raw = tiny_dict(paths={"raw": str(tmp_path / "raw")}, data={"folder": str(tmp_path / "link" / "photos")})
    with pytest.raises(ConfigError, match=r"`data.folder` .*link/photos'\) is inside `paths.raw`"):
        params_from_dict(raw)


def test_download_refuses_a_source_folder_inside_paths_raw_and_keeps_it(tmp_path, monkeypatch, capsys):
    """The case that deleted a user's photos: `data.folder: data/raw/photos` and download's rename of paths.raw."""
    from PIL import Image

    from workflow.__main__ import main

    monkeypatch.chdir(tmp_path)
    photos = tmp_path / "data" / "raw" / "photos"
    photos.mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(photos / "cat.png")
    data = {"source": "imagefolder:data/raw/photos", "folder": "data/raw/photos"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_dict(data=data)))
    assert main(["download", "--params", "params.yaml"]) == 1
    assert "`data.folder` ('data/raw/photos') is inside `paths.raw` ('data/raw')" in capsys.readouterr().err
    assert sorted(p.name for p in photos.iterdir()) == ["cat.png"]


def test_a_path_with_a_nul_is_one_config_error():
    with pytest.raises(ConfigError, match=r"`paths.raw` must be a non-empty path with no NUL character"):
        params_from_dict(tiny_dict(paths={"raw": "data/\0raw"}))


@pytest.mark.parametrize(
    "section, key", [("data", "revision"), ("data", "split"), ("data", "image_column"), ("fid", "weights")]
)
def test_an_empty_string_where_it_means_nothing_is_refused_naming_the_key(section, key):
    """`data.revision: ""` was read as main, `data.image_column: ""` failed later with a KeyError traceback,
    `fid.weights: ""` chose the default extractor: each is one error naming the key."""
    raw = tiny_dict(data={"source": "hf:org/flowers"})
    raw[section] = {**raw.get(section, {}), key: ""}
    with pytest.raises(ConfigError, match=rf"`{section}.{key}` must (not be empty|be a non-empty path)"):
        params_from_dict(raw)


@pytest.mark.parametrize("key, value", [("revision", "v1.0"), ("config", "full"), ("label_column", "label")])
@pytest.mark.parametrize("source", ["builtin:mnist", "imagefolder:data/images"])
def test_an_hf_only_data_key_is_refused_for_another_source(key, value, source):
    """Only the hf: fetch reads them: elsewhere they were silently not used (a label column on an image folder
    gave no labels, or the sub-folders' ones)."""
    with pytest.raises(ConfigError, match=rf"`data.{key}` applies to `data.source: hf:<owner>/<name>` only") as err:
        params_from_dict(tiny_dict(data={"source": source, key: value}))
    assert f"not {source!r}: set it to null" in str(err.value)
    assert ("sub-folders" in str(err.value)) == (key == "label_column")
    assert getattr(params_from_dict(tiny_dict(data={"source": "hf:org/flowers", key: value})).data, key) == value
