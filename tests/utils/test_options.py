"""Options dataclasses: validation on construction, fingerprints of the numbers-changing fields, one tree."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from difffeat.features.options import ExtractOptions, ImageModelOptions, TextModelOptions
from difffeat.heads.fusion import FusionOptions
from difffeat.heads.probe import ProbeOptions
from difffeat.run.config import ConfigError, RunConfig, load_config
from difffeat.search import SearchOptions
from difffeat.utils.options import (
    OptionError,
    Options,
    added_later,
    fingerprint,
    from_dict,
    numbers_fields,
    option,
    option_paths,
)


@dataclass
class Toy(Options):
    size: int = option(3, min=1, max=10, numbers=True, help="a size")
    kind: str = option("a", choices=("a", "b"), numbers="image", help="a kind")
    names: list[str] = option(default_factory=list, choices=("x", "y"), help="names")
    workers: int = option(0, min=0, help="speed only")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, r"Toy.size: 0 is too small; must be >= 1"),
        ({"size": 11}, r"Toy.size: 11 is too large; must be <= 10"),
        ({"size": 2.5}, r"Toy.size: expected int, got 2.5"),
        ({"size": True}, r"Toy.size: expected int, got True"),
        ({"kind": "c"}, r"Toy.kind: 'c' is not allowed; choose from 'a', 'b'"),
        ({"names": ["x", "z"]}, r"Toy.names: 'z' is not allowed"),
        ({"names": "x"}, r"Toy.names: expected a list"),
    ],
)
def test_a_bad_value_is_one_error_naming_the_field_the_value_and_what_is_allowed(kwargs, message):
    with pytest.raises(OptionError, match=message):
        Toy(**kwargs)


def test_tuples_become_lists_and_ints_become_floats_where_declared():
    assert Toy(names=("x", "y")).names == ["x", "y"]
    assert ProbeOptions(lr=1).lr == 1.0 and isinstance(ProbeOptions(lr=1).lr, float)


def test_the_fingerprint_follows_exactly_the_numbers_fields_of_its_scope():
    base = fingerprint(Toy())
    assert fingerprint(Toy(workers=4)) == base  # speed only
    assert fingerprint(Toy(size=4)) != base
    assert fingerprint(Toy(kind="b")) == base  # another scope's field
    assert fingerprint(Toy(kind="b"), scope="image") != fingerprint(Toy(), scope="image")
    assert fingerprint(Toy()) == fingerprint(Toy())  # stable
    assert set(numbers_fields(Toy(), scope="all")) == {"size", "kind"}


@dataclass
class Later(Options):
    size: int = option(3, numbers=True)
    added: str = added_later("old", choices=("old", "new"))  # a field added after stores were written


def test_a_field_added_with_keyed_default_false_keeps_the_keys_written_before_it():
    assert numbers_fields(Later()) == {"size": 3}
    assert numbers_fields(Later(added="new")) == {"size": 3, "added": "new"}
    assert not {"tap", "guidance", "shift"} & set(numbers_fields(ImageModelOptions()))  # the defaults key nothing
    assert numbers_fields(ImageModelOptions(tap="modulated"))["tap"] == "modulated"
    assert "vae_dtype" not in numbers_fields(ImageModelOptions()) and "dtype" not in numbers_fields(TextModelOptions())
    assert fingerprint(Later(added="new")) != fingerprint(Later())
    with pytest.raises(OptionError, match="added"):  # its other checks are option's
        Later(added="newer")


def test_from_dict_names_where_the_unknown_key_or_bad_value_is():
    with pytest.raises(OptionError, match=r"cfg.yaml.toy: unknown key\(s\) \['sise'\]"):
        from_dict(Toy, {"sise": 3}, "cfg.yaml.toy")
    with pytest.raises(OptionError, match=r"^cfg.yaml.toy.size: 0 is too small"):
        from_dict(Toy, {"size": 0}, "cfg.yaml.toy")


def test_a_notebook_user_gets_the_checks_of_the_command_line():
    for make in (
        lambda: ExtractOptions(shard_size=0),
        lambda: ExtractOptions(store_dtype="int8"),
        lambda: ExtractOptions(device="gpu"),
        lambda: SearchOptions(mode="grd"),
        lambda: SearchOptions(image_start=[3]),
        lambda: FusionOptions(ablations=["imgae"]),
        lambda: FusionOptions(baselines=["pixel"]),
        lambda: ProbeOptions(lr=0),
        lambda: ImageModelOptions(numerics="offical"),
    ):
        with pytest.raises(OptionError):
            make()


def test_the_run_config_composes_the_library_options_with_the_same_defaults(tmp_path):
    """One tree: ``fit_fusion()`` in a notebook and ``difffeat fit`` read the same dataclass and defaults."""
    empty = tmp_path / "c.yaml"
    empty.write_text("out: x\n")
    cfg = load_config(empty)
    assert cfg.probe == ProbeOptions() and cfg.fusion == FusionOptions() and cfg.search == SearchOptions()
    assert cfg.extract == ExtractOptions() and type(cfg.fusion) is FusionOptions


def test_every_option_has_help_and_a_path_the_config_accepts(tmp_path):
    paths = list(option_paths(RunConfig))
    assert len(paths) > 60
    for path, field, _ in paths:
        assert field.metadata.get("help"), path
    sections = {p.split(".")[0] for p, _, _ in paths}
    assert sections == {f.name for f in dataclasses.fields(RunConfig)}


def test_a_config_error_is_a_config_error():
    with pytest.raises(ConfigError):
        from difffeat.run.config import apply_overrides

        apply_overrides(RunConfig(), ["extract.shard_size=0"])
