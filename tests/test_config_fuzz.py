"""Property-based tests of the params loader (hypothesis): whatever value, type or key is put anywhere
in params.yaml, the loader answers with valid Params or one ConfigError naming the key; never another
exception, never a traceback from deep inside torch or diffusers later, and never a value that hangs
or exhausts memory (every number is bounded; the UNet's size is checked on the meta device).
The examples are the same on every run (tests/conftest.py: the "ci" hypothesis profile)."""

import math
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.helpers import tiny_dict
from workflow.core.config import ConfigError, Params, load_params, params_from_dict
from workflow.models.builders import build_unet, check_size


def key_paths(tree: dict, prefix: str = "") -> list[str]:
    """Every dotted key of `tree`: sections and leaves."""
    paths = []
    for name, value in tree.items():
        paths.append(prefix + name)
        if isinstance(value, dict):
            paths += key_paths(value, f"{prefix}{name}.")
    return paths


KEYS = key_paths(Params().to_dict())
SECTIONS = [k for k in KEYS if isinstance(Params().to_dict().get(k), dict)]
ANY_VALUE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["0", "1e-4", "nan", "-inf", "ddim", "imagefolder:x", "hf:a/b", ""]),
    st.lists(st.one_of(st.integers(-4, 130), st.text(max_size=3), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
    st.sampled_from([0, -1, 0.0, -0.5, 1.5, math.inf, -math.inf, math.nan, 2**64, [], [0, 32], [16, -32], [1.0]]),
)
FUZZ = settings(max_examples=250, suppress_health_check=[HealthCheck.too_slow])  # + the profile's deadline


def put(raw: dict, key: str, value) -> dict:
    *sections, leaf = key.split(".")
    node = raw
    for name in sections:
        if not isinstance(node.get(name), dict):
            node[name] = {}
        node = node[name]
    node[leaf] = value
    return raw


def accepted_or_named(raw: dict, key: str) -> None:
    try:
        params = params_from_dict(raw)
    except ConfigError as error:
        assert f"`{key}" in str(error), (key, str(error))
        return
    assert params_from_dict(params.to_dict()) == params  # what was accepted is valid and round-trips
    for section in ("train", "fid", "scheduler", "data"):
        for value in params.to_dict()[section].values():
            assert not isinstance(value, float) or math.isfinite(value)
    if key.split(".")[0] in ("model", "train", "data"):  # within the caps, or one error naming the key
        try:
            check_size(params)
        except ConfigError as error:
            assert f"`{key}" in str(error) or f"`{key.split('.')[0]}.*`" in str(error), (key, str(error))
            return
        with torch.device("meta"):  # an accepted model builds (on the meta device: no memory, no time)
            build_unet(params.model, resolution=params.data.resolution, channels=params.data.channels)


@FUZZ
@given(key=st.sampled_from(KEYS), value=ANY_VALUE)
@example(key="model.layers_per_block", value=1000000)  # once built a million layers (12 GB, 7+ minutes)
@example(key="model.block_out_channels", value=[4096, 4096])  # within every bound, ~3 B parameters
@example(key="train.batch_size", value=65536)  # the largest batch: a small UNet's activations stay small
def test_any_value_at_any_key_is_valid_or_one_config_error_naming_it(key, value):
    accepted_or_named(put(tiny_dict(), key, value), key)


@FUZZ
@given(section=st.sampled_from(["", *SECTIONS]), name=st.text(min_size=1, max_size=10), value=ANY_VALUE)
def test_unknown_keys_anywhere_are_named(section, name, value):
    key = f"{section}.{name}" if section else name
    if key in KEYS:
        return
    raw = tiny_dict()
    (raw if not section else raw.setdefault(section, {}))[name] = value
    try:
        params_from_dict(raw)
    except ConfigError as error:
        assert f"unknown key `{key}`" in str(error)
    else:
        raise AssertionError(f"unknown key {key!r} accepted")


TRICKY_YAML = st.one_of(
    st.sampled_from(
        [
            "2024-13-45",
            "2024-01-01",
            ".inf",
            "-.nan",
            "0x1F",
            "0o17",
            "1_000",
            "~",
            "[",
            "{a: 1}",
            "{1: 2, b: 3}",
            "!!python/object/apply:os.system ['true']",
            "&a [*a]",
            "yes",
            "off",
            "'8'",
            "|\n  x",
            '"\\u0000"',
            "1e400",
            "- 1\n- 2",
        ]
    ),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=16),
)


@FUZZ
@given(key=st.sampled_from(KEYS), text=TRICKY_YAML)
def test_any_yaml_text_loads_or_is_one_config_error(key, text):
    """Values as YAML text (dates, hex, anchors, tags, broken syntax): parsed by the real loader."""
    marker = "@@VALUE@@"
    document = yaml.safe_dump(put(tiny_dict(), key, marker), sort_keys=False)
    document = document.replace(f"'{marker}'", text).replace(marker, text)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(document, encoding="utf-8")
        try:
            load_params(path)
        except ConfigError as error:
            assert str(path) in str(error) or "`" in str(error)


def test_non_utf8_params_file_is_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"seed: \xff\xfe\n")
    try:
        load_params(path)
    except ConfigError as error:
        assert "not valid YAML" in str(error)
    else:
        raise AssertionError("accepted")
