"""Which sources validation scores apart, and their names: data.valid_path as one path, a list or a
mapping (else data.path); a blend's val split gives one source per dataset; a source without a val
split is refused naming it. No process group, no model."""

from pathlib import Path

import pytest
import yaml

from sail_megatron.config import ConfigError
from sail_megatron.config.data import DataConfig
from sail_megatron.data.blend import write_blend
from sail_megatron.data.demo_dataset import write_demo_raw
from sail_megatron.data.prepare import prepare
from sail_megatron.data.valid_sources import check_valid_sources, datasets_left_unvalidated, valid_sources


def _names(data: DataConfig):
    return [(s.name, Path(s.path).name, s.field) for s in valid_sources(data)]


def _metadataset(path: Path, val) -> Path:
    doc = {"__module__": "megatron.energon", "__class__": "MetadatasetV2", "splits": {"val": val}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory):
    """A prepared folder with no val split."""
    tmp = tmp_path_factory.mktemp("unsplit")
    raw = write_demo_raw(tmp / "raw")
    prepare(raw.captions_jsonl, raw.images_dir, tmp / "plain", fmt="caption", shard_size=16, progress=False)
    return tmp / "plain"


def test_the_forms_of_valid_path(demo):
    blend = str(demo / "blend.yaml")
    # Unset: data.path's val split; a blend's datasets are the sources, named by their folders.
    assert _names(DataConfig(path=blend)) == [("captions", "captions", "data.path"), ("sft", "sft", "data.path")]
    assert [s.blend for s in valid_sources(DataConfig(path=blend))] == [blend, blend]
    # One folder (backwards compatible: one source), a list, a mapping (a blend under a name is one source).
    assert _names(DataConfig(path=blend, valid_path=str(demo / "sft"))) == [("sft", "sft", "data.valid_path")]
    assert _names(DataConfig(path=blend, valid_path=[str(demo / "sft"), str(demo / "captions")])) == [
        ("sft", "sft", "data.valid_path[0]"),
        ("captions", "captions", "data.valid_path[1]"),
    ]
    assert _names(DataConfig(path=blend, valid_path={"chat": str(demo / "sft"), "all": blend})) == [
        ("chat", "sft", "data.valid_path.chat"),
        ("all", "blend.yaml", "data.valid_path.all"),
    ]
    check_valid_sources(DataConfig(path=blend, valid_path={"chat": str(demo / "sft"), "all": blend}))


def test_names_stay_unique_and_a_dataset_is_scored_once(tmp_path):
    for folder in ("a/data", "b/data", "c"):
        (tmp_path / folder).mkdir(parents=True)
    nested = _metadataset(tmp_path / "inner.yaml", {"blend": [{"path": "b/data", "weight": 1.0}]})
    outer = _metadataset(tmp_path / "outer.yaml", {"blend": [{"path": "a/data"}, {"path": nested.name}]})
    # Nested blends are followed; equal folder names take their parent folders.
    assert [s.name for s in valid_sources(DataConfig(path=str(outer)))] == ["a/data", "b/data"]
    assert [s.name for s in valid_sources(DataConfig(valid_path=[str(outer), str(tmp_path / "c")]))] == [
        "a/data",
        "b/data",
        "c",
    ]
    with pytest.raises(ConfigError) as info:
        valid_sources(DataConfig(valid_path=[str(outer), str(tmp_path / "a" / "data")]))
    assert info.value.field == "data.valid_path[1]" and "validated twice" in str(info.value)
    # A val split energon reads in other ways (here: subflavors) is one source, named by the YAML.
    special = _metadataset(tmp_path / "special.yaml", {"blend": [{"path": "c", "subflavors": {"k": 1}}]})
    assert [(s.name, s.path) for s in valid_sources(DataConfig(path=str(special)))] == [("special", str(special))]


def test_a_source_without_val_data_is_named(demo, unsplit, tmp_path):
    with pytest.raises(ConfigError) as info:
        check_valid_sources(
            DataConfig(path=str(demo / "blend.yaml"), valid_path={"ok": str(demo / "sft"), "x": str(unsplit)})
        )
    assert info.value.field == "data.valid_path.x" and "validation source 'x'" in str(info.value)
    assert "no samples in its val split" in str(info.value) and "--valid-fraction" in str(info.value)
    # A blend's val split listing a folder that holds out nothing: that dataset is named.
    mixed = _metadataset(tmp_path / "mixed.yaml", {"blend": [{"path": str(demo / "sft")}, {"path": str(unsplit)}]})
    with pytest.raises(ConfigError) as info:
        check_valid_sources(DataConfig(path=str(mixed)))
    assert info.value.field == "data.path"
    assert f"validation source 'plain' (a dataset of {mixed}'s val split)" in str(info.value)
    with pytest.raises(ConfigError, match="data.valid_path.gone: .* does not exist"):
        check_valid_sources(DataConfig(path=str(mixed), valid_path={"gone": str(tmp_path / "nowhere")}))


def test_a_trained_dataset_without_held_out_data_is_reported(demo, unsplit, tmp_path):
    (tmp_path / "sft").symlink_to(demo / "sft")
    (tmp_path / "plain").symlink_to(unsplit)
    blend = write_blend(tmp_path / "blend.yaml", {"sft": 1.0, "plain": 1.0})  # val split: sft only
    data = DataConfig(path=str(blend))
    sources = check_valid_sources(data)
    assert [s.name for s in sources] == ["sft"]
    assert datasets_left_unvalidated(data, sources) == [str(tmp_path / "plain")]
    assert datasets_left_unvalidated(DataConfig(path=str(blend), valid_path=str(demo / "sft")), sources) == []
