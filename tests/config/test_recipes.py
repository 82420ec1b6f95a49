"""Every recipe in examples/configs loads and validates; overrides and errors name their keys."""

from pathlib import Path

import pytest

from sail_megatron.config import ConfigError
from sail_megatron.config.train import load_train_config

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"
RECIPES = sorted(p for p in CONFIGS.glob("*/*.yaml") if not p.name.startswith("_"))
STAGE_RECIPES = [p for p in RECIPES if p.stem != "demo"]
# World sizes the recipes are written for: tiny on 4 CPU processes, H100 recipes on one and two nodes.
WORLD = {
    "tiny": (4, False, False),
    "tiny-aimv2": (4, False, False),
    "sail-vl-2b": (8, True, True),
    "sail-vl-8b": (16, True, True),
    "sail-vl-1.5-2b": (8, True, True),
    "sail-vl-1.6-8b": (16, True, True),
    "sail-vl2-moe": (16, True, True),
}
STAGES = ["1-pretrain-alignment", "2-pretrain-advance", "3-sft-knowledge", "4-sft-instruction", "5-sft-preference"]
TRAINABLE = {
    "1": ["projector"],
    "2": ["vision", "projector"],
    "3": ["vision", "projector", "language"],
    "4": ["vision", "projector", "language"],
    "5": ["vision", "projector", "language"],
}


def test_every_stage_exists_for_every_size():
    assert {(p.parent.name, p.stem) for p in STAGE_RECIPES} == {(s, st) for s in WORLD for st in STAGES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_validates(recipe):
    cfg = load_train_config(recipe)
    world, cuda, te = WORLD[recipe.parent.name]
    cfg.validate(world_size=world, has_cuda=cuda, has_te=te)
    assert cfg.model_preset == recipe.parent.name
    assert cfg.freeze.trainable == TRAINABLE.get(recipe.stem[0], ["vision", "projector", "language"])
    assert cfg.data.packing and cfg.data.micro_batch_size == 1


@pytest.mark.parametrize("size", sorted(WORLD))
def test_stages_chain_through_checkpoints(size):
    cfgs = [load_train_config(CONFIGS / size / f"{s}.yaml") for s in STAGES]
    for prev, cur in zip(cfgs, cfgs[1:]):
        assert cur.run.init_from == prev.run.save_dir


def test_sizes_carry_the_real_dimensions():
    two, eight = (load_train_config(CONFIGS / s / "3-sft-knowledge.yaml") for s in ("sail-vl-2b", "sail-vl-8b"))
    assert (two.model.language.hidden_size, eight.model.language.hidden_size) == (1536, 3584)
    assert two.model.vision.select_layer == -4 and eight.parallel.sequence_parallel


def test_sail_vl_15_and_16_use_aimv2_and_their_chat_template():
    for size, hidden in (("sail-vl-1.5-2b", 1536), ("sail-vl-1.6-8b", 3584)):
        for stage in STAGES:
            cfg = load_train_config(CONFIGS / size / f"{stage}.yaml")
            assert cfg.model.vision.arch == "aimv2" and cfg.model.vision.select_layer == -1
            assert cfg.model.language.hidden_size == hidden and cfg.data.template == "sailvl-chat"


def test_the_moe_recipes_keep_each_layers_experts_inside_one_node():
    for stage in STAGES:
        cfg = load_train_config(CONFIGS / "sail-vl2-moe" / f"{stage}.yaml")
        p, lang = cfg.parallel, cfg.model.language
        assert lang.is_moe and cfg.model.vision.arch == "aimv2"
        assert p.expert_model_parallel_size * p.expert_tensor_size == 8  # all-to-alls over NVLink
        assert lang.num_experts % p.expert_model_parallel_size == 0
        trains_language = "language" in cfg.freeze.trainable
        assert (p.recompute_granularity == "full") == trains_language  # the expert activations, when they train


def test_dotted_overrides(tmp_path):
    cfg = load_train_config(
        CONFIGS / "tiny" / "3-sft-knowledge.yaml",
        ["optim.lr=3e-5", "model.vision.select_layer=-2", "run.init_from=null"],
    )
    assert cfg.optim.lr == 3e-5 and cfg.model.vision.select_layer == -2 and cfg.run.init_from is None


@pytest.mark.parametrize(
    "override,field",
    [
        ("optim.lrr=1", "optim.lrr"),
        ("model.language.heads=2", "model.language.heads"),
        ("run.train_steps=many", "run.train_steps"),
        ("parallel.sequence_parallel=3", "parallel.sequence_parallel"),
        ("freeze.trainable=projector", "freeze.trainable"),
        ("model_preset=sail-vl-99b", "model_preset"),
        ("optim.lr", "optim.lr"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, field):
    with pytest.raises(ConfigError) as e:
        load_train_config(CONFIGS / "tiny" / "1-pretrain-alignment.yaml", [override])
    assert e.value.field == field


def test_inheritance_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("inherit: b.yaml\n")
    (tmp_path / "b.yaml").write_text("inherit: a.yaml\n")
    with pytest.raises(ConfigError, match="inherits itself"):
        load_train_config(tmp_path / "a.yaml")


def test_global_batch_must_divide(tmp_path):
    cfg = load_train_config(CONFIGS / "sail-vl-2b" / "3-sft-knowledge.yaml", ["run.global_batch_size=100"])
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=64, has_cuda=True, has_te=True)
    assert e.value.field == "run.global_batch_size"


def test_schedules_and_part_lrs_in_recipes():
    advance = load_train_config(CONFIGS / "sail-vl-2b" / "2-pretrain-advance.yaml")
    assert advance.optim.schedule == "wsd" and advance.parallel.recompute_vision
    sft = load_train_config(CONFIGS / "sail-vl-8b" / "3-sft-knowledge.yaml")
    assert sft.optim.part_lrs() == {"vision": 2e-6, "projector": 2e-5, "language": 2e-5}


@pytest.mark.parametrize(
    "override,field",
    [
        ("optim.schedule=linear", "optim.schedule"),
        ("optim.vision_lr=-1", "optim.vision_lr"),
        ("optim.wsd_decay_steps=0", "optim.wsd_decay_steps"),
        ("optim.decay_steps=1", "optim.decay_steps"),
        ("parallel.recompute_granularity=most", "parallel.recompute_granularity"),
        ("parallel.recompute_method=ring", "parallel.recompute_method"),
        ("run.max_nonfinite_steps=0", "run.max_nonfinite_steps"),
        ("precision.layers=te", "precision.layers"),
        ("precision.layers=fast", "precision.layers"),
    ],
)
def test_optim_and_recompute_errors_name_the_key(override, field):
    cfg = load_train_config(CONFIGS / "tiny" / "2-pretrain-advance.yaml", [override])
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=4, has_cuda=False, has_te=False)
    assert e.value.field == field


def test_full_recompute_layers_must_fit_a_stage():
    cfg = load_train_config(CONFIGS / "tiny" / "3-sft-knowledge.yaml", ["parallel.recompute_num_layers=3"])
    with pytest.raises(ConfigError) as e:  # 4 layers over PP=2: 2 per stage
        cfg.validate(world_size=4, has_cuda=False, has_te=False)
    assert e.value.field == "parallel.recompute_num_layers"


@pytest.mark.parametrize(
    "text,problem",
    [
        ("optim: {lr: 1e-4\n", "is not valid YAML at line 2"),
        ("optim:\n\tlr: 1e-4\n", "is not valid YAML at line 2"),
        ("optim: {lr: 1e-4}\noptim: {lr: 2e-4}\n", "key 'optim' appears twice"),
        ("", "the recipe is empty"),
        ("- a list\n", "must be a YAML mapping"),
    ],
)
def test_recipe_file_errors_name_the_file_and_line(tmp_path, text, problem):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        load_train_config(recipe)
