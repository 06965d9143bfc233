import pytest

from difffeat.run.config import ConfigError, RunConfig, apply_overrides, load_config, save_config


def test_yaml_round_trip_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("out: runs/x\nextract:\n  image_blocks: [3, 6]\n  seed: 2\n")
    cfg = load_config(p, ["extract.seed=5", "data.kind=coco"])
    assert cfg.extract.image_blocks == [3, 6] and cfg.extract.seed == 5 and cfg.data.kind == "coco"
    save_config(cfg, tmp_path / "back.yaml")
    assert load_config(tmp_path / "back.yaml") == cfg


def test_unknown_key_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("extract:\n  image_blockz: [3]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml\.extract: unknown key\(s\) \['image_blockz'\]"):
        load_config(p)


def test_wrong_type_is_an_error(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("extract:\n  seed: three\n")
    with pytest.raises(ConfigError, match="extract.seed: expected int"):
        load_config(p)
    with pytest.raises(ConfigError, match="not a config section"):
        apply_overrides(RunConfig(), ["out.x=1"])
