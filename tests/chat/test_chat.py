"""`sail-chat` on a tiny trainer run and its Hugging Face export: the prompt is what training renders, the
answer is the argmax loop over the training forward, the export answers like the checkpoint, and bad
input exits with code 2 and one line."""

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Dict

import pytest
import torch
import yaml

from sail_megatron.chat.cli import main
from sail_megatron.data.chat_template import ChatTemplate
from sail_megatron.data.sample import MalformedSample, VLSample
from sail_megatron.data.tiling import TilePlan, plan_tiles
from tests.helpers.multiprocess import run_on_ranks

PROMPT = "What is in the picture?"
MAX_NEW = 6


def _conversation(turns, images=()) -> VLSample:
    return VLSample(__key__="k", __restore_key__=(), kind="conversation", turns=turns, images=list(images))


def _photo_and_tokenizer(root: Path):
    """One demo photo (scikit-image's chelsea, 451 x 300: 3 x 2 tiles + thumbnail) and a tokenizer trained
    on the demo dataset's text, small enough for the tiny preset's 512-row vocabulary."""
    import skimage.data
    from PIL import Image

    from sail_megatron.data.demo_dataset import demo_texts
    from sail_megatron.data.tokenizer import build_demo_tokenizer

    Image.fromarray(skimage.data.chelsea()).save(root / "chelsea.jpg", quality=90)
    return build_demo_tokenizer(demo_texts(), root / "tokenizer", vocab_size=500)


def _tiny_run(root: Path, tokenizer: Path) -> Path:
    """A trainer run folder as a run leaves it at its first checkpoint: the tiny preset with the weights
    training starts from, saved in bf16 (the GPU recipes' dtype), and the run's config.yaml."""
    from sail_megatron.config import ParallelConfig, PrecisionConfig
    from sail_megatron.config.data import DataConfig
    from sail_megatron.config.presets import get_preset
    from sail_megatron.config.train import TrainConfig, dump
    from sail_megatron.convert.mcore_io import single_process
    from sail_megatron.data.tokenizer import load_tokenizer
    from sail_megatron.model.build import build_model
    from sail_megatron.training.checkpoint import save_checkpoint

    cfg = get_preset("tiny")
    cfg.image_context_token_id = load_tokenizer(tokenizer).ids.img_context
    precision = PrecisionConfig(dtype="bf16")
    run = root / "run"
    with single_process():
        save_checkpoint(run, 1, [build_model(cfg, ParallelConfig(), precision)])
    # internvl2_5: the template `sail-convert mcore-to-hf` records for trainer checkpoints.
    data = DataConfig(tokenizer=str(tokenizer), template="internvl2_5")
    (run / "config.yaml").write_text(dump(TrainConfig(model=cfg, precision=precision, data=data)))
    return run


def _ask_directly(ckpt: Path, photo: Path) -> Dict:
    """The answer through sail-chat's pieces, and the argmax loop over full training forwards beside it."""
    from sail_megatron.chat.generate import choose, greedy, last_logits
    from sail_megatron.chat.loading import load_chat_model, one_process
    from sail_megatron.chat.prompt import first_batch, next_batch
    from sail_megatron.chat.session import prepare

    p = prepare(ckpt, [str(photo)], PROMPT)
    src, tok, cpu = p.source, p.tokenizer, torch.device("cpu")
    with one_process(cpu):
        model = load_chat_model(src, tok.ids.img_context, cpu, "fp32")
        batch = first_batch(p.ids, p.images, tok, src.model.vision.image_size, src.model.tokens_per_tile, src.data, cpu)
        reply = greedy(model, batch, tok, src.model.language.vocab_size, MAX_NEW)
        # The reference: every step a new forward over the whole row, vision encoder included.
        ids, loop, first_logits = list(p.ids), [], None
        for _ in range(MAX_NEW):
            logits = last_logits(model, next_batch(batch, ids))
            first_logits = logits if first_logits is None else first_logits
            usable = logits[: min(src.model.language.vocab_size, tok.vocab_size)].clone()
            usable[tok.ids.img_context] = float("-inf")
            token = int(usable.argmax())
            assert token == choose(logits, tok, src.model.language.vocab_size)
            if token in (tok.ids.im_end, tok.ids.eos):
                break
            ids.append(token)
            loop.append(token)
    return {
        "prompt": p.ids,
        "answer": reply.ids,
        "stopped_by": reply.stopped_by,
        "loop": loop,
        "first_logits": first_logits,
    }


def _sail_chat(argv) -> Dict:
    """`sail-chat ARGV` as the console script runs it (its exit code, stdout and stderr), in this process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):  # logging's handler is made inside: it writes to err
        code = main(argv)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def make_and_ask(root: str) -> Dict:
    """Runs in a fresh process: the run, its export, both answered, and sail-chat on the run folder."""
    from sail_megatron.convert.to_hf import mcore_to_hf

    root = Path(root)
    tokenizer = _photo_and_tokenizer(root)
    run, photo = _tiny_run(root, tokenizer), root / "chelsea.jpg"
    mcore_to_hf(run, root / "hf")
    result = {"run": _ask_directly(run, photo), "hf": _ask_directly(root / "hf", photo)}
    argv = ["--ckpt", str(run), "--image", str(photo), "--prompt", PROMPT, "--max-new-tokens", str(MAX_NEW)]
    result["cli"] = _sail_chat(argv + ["--device", "cpu"])
    return result


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (result,) = run_on_ranks(make_and_ask, 1, str(root))
    return root, result


def test_the_generation_prompt_is_the_training_render_up_to_the_answer(made):
    from sail_megatron.chat.session import prepare

    root, _ = made
    prepared = prepare(root / "run", [str(root / "chelsea.jpg")], PROMPT)
    tok, src = prepared.tokenizer, prepared.source
    assert src.data.max_tiles == 6 and src.data.use_thumbnail
    template = ChatTemplate(tok, src.model.tokens_per_tile, src.data.system_prompt, src.data.template)
    plan = plan_tiles(451, 300, 1, 6, src.model.vision.image_size, True)
    assert plan == TilePlan(3, 2, True) and [i.plan for i in prepared.images] == [plan]
    turns = [("user", "<image>\n" + PROMPT), ("assistant", "A cat.")]
    trained = template.encode(_conversation(turns, [b""]), [b""], [plan], 4096)
    full = trained.tokens.tolist() + trained.labels[-1:].tolist()
    assert prepared.ids == full[: len(prepared.ids)]
    opening = [tok.ids.im_start] + tok.encode_text("assistant\n")
    assert prepared.ids[-len(opening) :] == opening
    assert tok.decode(full[len(prepared.ids) :]) == "A cat.<|im_end|>\n"
    assert prepared.ids.count(tok.ids.img_context) == 7 * src.model.tokens_per_tile == 112


def test_render_prompt_needs_a_conversation_ending_with_the_user(made):
    from sail_megatron.data.tokenizer import load_tokenizer

    root, _ = made
    template = ChatTemplate(load_tokenizer(root / "tokenizer"), 16, template="chatml")
    with pytest.raises(MalformedSample, match="ends with a user turn"):
        template.render_prompt(_conversation([("user", "hi"), ("assistant", "hello")]), [])
    ids = [t for p in template.render_prompt(_conversation([("user", "hi")]), []) for t in p.ids]
    assert template.tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_greedy_answer_is_the_argmax_loop_over_the_training_forward(made):
    from sail_megatron.data.tokenizer import load_tokenizer

    root, result = made
    run, tok = result["run"], load_tokenizer(root / "tokenizer")
    assert run["answer"] and run["answer"] == run["loop"], run
    logits = run["first_logits"][: tok.vocab_size].clone()  # 500 ids; the tiny model has 512 (+ padding)
    logits[tok.ids.img_context] = float("-inf")
    assert run["answer"][0] == int(logits.argmax())


def test_the_hf_export_answers_like_the_checkpoint(made):
    _, result = made
    assert result["hf"]["prompt"] == result["run"]["prompt"]
    assert result["hf"]["answer"] == result["run"]["answer"]
    torch.testing.assert_close(result["hf"]["first_logits"], result["run"]["first_logits"], rtol=0, atol=1e-5)


def test_sail_chat_answers_from_the_run_folder(made):
    from sail_megatron.data.tokenizer import load_tokenizer

    root, result = made
    cli, answer = result["cli"], result["run"]["answer"]
    assert cli["code"] == 0, cli["stderr"][-3000:]
    assert cli["stdout"] == load_tokenizer(root / "tokenizer").decode(answer) + "\n"
    assert f"answer: {len(answer)} tokens after a {len(result['run']['prompt'])}-token prompt" in cli["stderr"]


def _bad(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("sail-chat: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def transformers_export(tmp_path) -> Path:
    folder = tmp_path / "hf-native"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "internvl", "architectures": ["X"]}))
    return folder


def test_bad_inputs_exit_2_with_one_line(made, capsys, monkeypatch, tmp_path, transformers_export):
    # sail-chat sets these for its process; here they are undone after the test.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    root, _ = made
    run, photo = str(root / "run"), str(root / "chelsea.jpg")
    ask = ["--prompt", PROMPT, "--device", "cpu"]
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a photo")
    (tmp_path / "empty").mkdir()

    line = _bad(capsys, ["--ckpt", run, "--image", str(tmp_path / "missing.jpg")] + ask)
    assert f"--image {tmp_path / 'missing.jpg'}: no such file" in line
    line = _bad(capsys, ["--ckpt", run, "--image", str(not_an_image)] + ask)
    assert f"--image {not_an_image} is not a usable image" in line
    line = _bad(capsys, ["--ckpt", str(tmp_path / "empty"), "--image", photo] + ask)
    assert "is neither a training run nor a checkpoint nor a Hugging Face model folder" in line
    line = _bad(capsys, ["--ckpt", str(transformers_export), "--image", photo] + ask)
    assert "model_type 'internvl'" in line and "--format transformers" in line
    line = _bad(capsys, ["--ckpt", run, "--image", photo, "--dtype", "bf16"] + ask)
    assert "--dtype bf16 needs CUDA" in line


def test_a_trainer_export_is_prompted_as_the_run_was_trained():
    from sail_megatron.config.data import DataConfig
    from sail_megatron.convert.hf_config import data_from_hf_config
    from sail_megatron.convert.to_hf import _run_template

    run = DataConfig(template="chatml", system_prompt="Be brief.", min_tiles=2, max_tiles=4, use_thumbnail=False)
    config = _run_template(run, "fp32")  # what mcore-to-hf writes for a training run's checkpoint
    assert config["template"] == "internvl2_5"  # the nearest name InternVL-chat's remote code knows
    assert (config["min_dynamic_patch"], config["max_dynamic_patch"], config["use_thumbnail"]) == (2, 4, False)
    data = data_from_hf_config({**config, "dynamic_image_size": True}, None)
    assert (data.template, data.system_prompt, data.max_tiles, data.use_thumbnail) == ("chatml", "Be brief.", 4, False)


# --- sail-chat as the console script, in a subprocess ---------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def _chat_process(argv, cwd: Path, prunes: int = 0) -> subprocess.CompletedProcess:
    """`sail-chat ARGV` in a fresh process run from `cwd`; with `prunes`, a training "prunes" the checkpoint
    being read that many times, between the reader's resolving of `latest` and its read
    (tests/helpers/pruning_run.py)."""
    tool = ["-m", "tests.helpers.pruning_run", str(prunes), "sail-chat"] if prunes else ["-m", "sail_megatron.chat.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *tool, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


def _one_line_refusal(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("sail-chat: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def test_a_checkpoint_pruned_while_read_is_read_at_its_successor(made, tmp_path):
    """A training with run.keep_last 1 moves `latest` on and deletes the folder sail-chat resolved, just
    before the weights are read: one line says so and the answer comes from the new checkpoint."""
    root, result = made
    run = shutil.copytree(root / "run", tmp_path / "live")
    argv = ["--ckpt", str(run), "--image", str(root / "chelsea.jpg"), "--prompt", PROMPT, "--max-new-tokens", "1"]
    done = _chat_process(argv, tmp_path, prunes=1)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        f"checkpoint {run / 'iter_00000001'} was pruned while being read: the training writing {run} has moved "
        "`latest` on to iter_00000002; reading that one" in done.stderr
    ), done.stderr[-3000:]
    assert f"loaded {run / 'iter_00000002'} (run" in done.stderr and "damaged" not in done.stderr
    assert done.stdout.strip(), "no answer"


def test_a_run_is_read_from_another_working_folder(made, tmp_path):
    """config.yaml records data.tokenizer and run.save_dir as the training was given them, relative to the
    folder it ran in: sail-chat run from elsewhere finds the tokenizer there."""
    root, _ = made
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    run = shutil.copytree(root / "run", project / "runs" / "rel")
    shutil.copytree(root / "tokenizer", project / "data" / "tokenizer")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["tokenizer"], config["run"]["save_dir"] = "data/tokenizer", "runs/rel"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    elsewhere.mkdir()
    argv = ["--ckpt", str(run), "--image", str(root / "chelsea.jpg"), "--prompt", PROMPT, "--max-new-tokens", "1"]
    done = _chat_process(argv, elsewhere)
    assert done.returncode == 0, done.stderr[-3000:]
    # The transformers export needs that tokenizer too (its processor and image-token id).
    export = [sys.executable, "-m", "sail_megatron.convert.cli", "mcore-to-hf", "--ckpt", str(run), "--out", "tf"]
    done = subprocess.run(
        [*export, "--format", "transformers"], cwd=elsewhere, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "tf" / "tokenizer.json").is_file()
    assert f"tokenizer from the run's config.yaml: {project / 'data' / 'tokenizer'}" in done.stderr


def test_a_run_whose_tokenizer_is_nowhere_says_so(made, tmp_path, capsys, monkeypatch):
    """A recorded tokenizer in none of the places a relative path may mean: the clear error stays."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    root, _ = made
    run = shutil.copytree(root / "run", tmp_path / "runs" / "rel")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["tokenizer"], config["run"]["save_dir"] = "data/tokenizer", "runs/rel"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(root)
    line = _bad(capsys, ["--ckpt", str(run), "--image", str(root / "chelsea.jpg"), "--prompt", PROMPT])
    assert line.startswith(
        "sail-chat: the run's config names the tokenizer data/tokenizer, which is not a folder here (nor under "
        "the folder the training ran in, nor in the run folder): pass --tokenizer DIR"
    ), line


def test_an_image_that_is_no_file_is_named_for_what_it_is(made, tmp_path):
    root, _ = made
    (tmp_path / "loop_a.jpg").symlink_to("loop_b.jpg")
    (tmp_path / "loop_b.jpg").symlink_to("loop_a.jpg")
    argv = ["--ckpt", str(root / "run"), "--image", "loop_a.jpg", "--prompt", PROMPT]
    line = _one_line_refusal(_chat_process(argv, tmp_path))
    assert line == "sail-chat: --image loop_a.jpg is a symbolic link loop (Too many levels of symbolic links)"
