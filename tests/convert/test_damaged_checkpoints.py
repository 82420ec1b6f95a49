"""A damaged megatron checkpoint is named, with the folder and the file at fault, before anything loads it:
`check_checkpoint` on its own, and `sail-convert mcore-to-hf` / `verify` ending with exit code 2 and a
message of a few lines (no traceback), leaving no output behind.

Every case damages a copy of one real checkpoint (a tiny model saved by sail-convert's own writer).
"""

import shutil
from pathlib import Path
from typing import Callable, Dict, Tuple

import pytest
import yaml

from sail_megatron.training.checkpoint_files import CheckpointError, check_checkpoint, checkpoint_read_errors
from tests.convert import cli_workers
from tests.helpers.multiprocess import run_on_ranks

ITER = "iter_00000000"


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def _data_folder(root: Path) -> None:
    shutil.rmtree(root)
    root.mkdir()
    (root / "shard-000000.tar").write_bytes(b"\0" * 512)
    (root / "img.jpg").write_bytes(b"\xff\xd8\xff")


# name -> (damage applied to a copy of the checkpoint folder, folder the message names, words it must hold)
CASES: Dict[str, Tuple[Callable[[Path], None], str, Tuple[str, ...]]] = {
    "latest_names_missing_iter": (
        lambda r: _write(r / "latest", b"iter_00000099\n"),
        "",
        ("`latest` names iter_00000099, which does not exist", ITER),
    ),
    "latest_garbage": (
        lambda r: _write(r / "latest", b"garbage\n../../etc"),
        "",
        ("`latest` does not name an iter_* folder", "garbage"),
    ),
    "latest_leaves_the_folder": (
        lambda r: _write(r / "latest", b"../mcore/" + ITER.encode()),
        "",
        ("`latest` does not name an iter_* folder",),
    ),
    "latest_empty": (lambda r: _write(r / "latest", b""), "", ("`latest` is empty",)),
    "latest_removed": (lambda r: (r / "latest").unlink(), "", ("no `latest` pointer", ITER)),
    "shard_missing": (lambda r: (r / ITER / "__0_1.distcp").unlink(), ITER, ("__0_1.distcp is missing",)),
    "shard_truncated": (
        lambda r: _truncate(r / ITER / "__0_0.distcp", 100_000),
        ITER,
        ("__0_0.distcp is truncated: 100000 bytes",),
    ),
    "metadata_missing": (lambda r: (r / ITER / ".metadata").unlink(), ITER, (".metadata is missing",)),
    "metadata_truncated": (lambda r: _truncate(r / ITER / ".metadata", 200), ITER, (".metadata is unreadable",)),
    "common_missing": (lambda r: (r / ITER / "common.pt").unlink(), ITER, ("common.pt is missing",)),
    "common_truncated": (lambda r: _truncate(r / ITER / "common.pt", 1000), ITER, ("common.pt is damaged",)),
    "metadata_json_missing": (lambda r: (r / ITER / "metadata.json").unlink(), ITER, ("metadata.json is missing",)),
    "data_folder": (_data_folder, "", ("holds no checkpoint",)),
}
FIX = "Fix: "


def _damaged(source: Path, dest: Path, case: str) -> Path:
    shutil.copytree(source, dest)
    CASES[case][0](dest)
    return dest


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_names_the_folder_and_the_file(tiny_checkpoints, tmp_path, case):
    ckpt = _damaged(tiny_checkpoints / "mcore", tmp_path / "mcore", case)
    _, where, needles = CASES[case]
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(ckpt)
    message = str(err.value)
    assert message.startswith(f"checkpoint {ckpt / where if where else ckpt}: "), message
    assert all(n in message for n in needles), message
    assert len(message.splitlines()) <= 3 and message.splitlines()[-1].startswith(FIX), message
    assert err.value.folder == (ckpt / where if where else ckpt)


def test_complete_checkpoints_pass(tiny_checkpoints):
    for run, iteration in (("mcore", ITER), ("run", "iter_00000005")):
        folder = tiny_checkpoints / run / iteration
        assert check_checkpoint(tiny_checkpoints / run) == folder
        assert check_checkpoint(folder) == folder


def test_many_missing_shards_are_counted(tiny_checkpoints, tmp_path):
    # More shards than are worth listing one by one: a few are named, the rest counted.
    ckpt = shutil.copytree(tiny_checkpoints / "mcore" / ITER, tmp_path / ITER)
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(ckpt)).read_metadata()
    for i, info in enumerate(metadata.storage_data.values()):
        info.relative_path = f"__{i}_0.distcp"
    import pickle

    (ckpt / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError) as err:
        check_checkpoint(ckpt)
    lines = str(err.value).splitlines()
    assert len(lines) == 8 and lines[-2].startswith("  - and ") and "more files like these" in lines[-2], lines


def test_load_errors_become_checkpoint_errors(tiny_checkpoints, tmp_path):
    from megatron.core import dist_checkpointing

    folder = shutil.copytree(tiny_checkpoints / "mcore" / ITER, tmp_path / ITER)
    (folder / "common.pt").unlink()
    with pytest.raises(CheckpointError) as err:  # what megatron itself raises, caught and named
        with checkpoint_read_errors(folder):
            dist_checkpointing.load_common_state_dict(str(folder))
    assert str(err.value).startswith(f"checkpoint {folder}: loading failed: CheckpointingException")
    assert "common.pt" in str(err.value)
    with pytest.raises(CheckpointError, match="EOFError: a file ended early"):
        with checkpoint_read_errors(folder):
            raise EOFError()
    with pytest.raises(CheckpointError, match="another model than the one being loaded"):
        with checkpoint_read_errors(folder):
            raise RuntimeError("Global shape mismatch for loaded (torch.Size([4, 64])) and expected ((2, 64))")
    # torch's checkpoint reader wraps each rank's exception; the message shows the wrapped one.
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointError) as err:
        with checkpoint_read_errors(folder):
            raise CheckpointException("load failed", {0: (FileNotFoundError(2, "No such file", "__0_1.distcp"), None)})
    assert "loading failed: FileNotFoundError: " in str(err.value) and "__0_1.distcp" in str(err.value)


def test_other_errors_pass_through(tmp_path):
    import torch.distributed as dist

    for error in (KeyError("not a file problem"), dist.DistNetworkError("peer closed the connection")):
        with pytest.raises(type(error)):
            with checkpoint_read_errors(tmp_path):
                raise error


VERIFIED = ("latest_names_missing_iter", "shard_truncated", "common_missing")


@pytest.fixture(scope="module")
def cli_runs(tiny_checkpoints, tmp_path_factory):
    """Every damaged copy through `mcore-to-hf` (and a few through `verify`), in one spawned process."""
    root = tmp_path_factory.mktemp("damaged_cli")
    cases = []
    for case in sorted(CASES):
        ckpt = _damaged(tiny_checkpoints / "mcore", root / case, case)
        cases.append(["mcore-to-hf", "--ckpt", str(ckpt), "--out", str(root / f"{case}.hf")])
        if case in VERIFIED:
            cases.append(["verify", "--hf", str(tiny_checkpoints / "hf"), "--ckpt", str(ckpt)])
    # Readable, but of another model than its config.yaml says: megatron's own error, reported as ours.
    other = shutil.copytree(tiny_checkpoints / "run", root / "other_model")
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["model"]["language"]["num_layers"] = 1
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    cases.append(["mcore-to-hf", "--ckpt", str(other), "--out", str(root / "other_model.hf")])
    (results,) = run_on_ranks(cli_workers.run_cli, 1, cases)
    return root, results


def _find(results, *argv: str) -> Dict:
    """The one run whose arguments include all of `argv`."""
    found = [r for r in results if all(a in r["argv"] for a in argv)]
    assert len(found) == 1, argv
    return found[0]


def _check_refused(result: Dict, *needles: str) -> str:
    assert result["rc"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"], result["stderr"]
    lines = cli_workers.error_lines(result)
    message = "\n".join(lines)
    assert 1 <= len(lines) <= 3 and all(n in message for n in needles), result["stderr"]
    return message


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_refuses_a_damaged_checkpoint(cli_runs, case):
    root, results = cli_runs
    ckpt = root / case
    _, where, needles = CASES[case]
    message = _check_refused(_find(results, "mcore-to-hf", str(ckpt)), *needles)
    assert message.startswith(f"sail-convert mcore-to-hf: checkpoint {ckpt / where if where else ckpt}: ")
    assert not (root / f"{case}.hf").exists() and not list(root.glob(f".{case}.hf.partial*"))
    if case in VERIFIED:
        _check_refused(_find(results, "verify", str(ckpt)), *needles)


def test_cli_names_a_checkpoint_of_another_model(cli_runs):
    root, results = cli_runs
    message = _check_refused(
        _find(results, "mcore-to-hf", str(root / "other_model")), "loading failed: ", "shape mismatch", "config.yaml"
    )
    assert str(root / "other_model" / "iter_00000005") in message
    assert not (root / "other_model.hf").exists() and not list(root.glob(".other_model.hf.partial*"))
