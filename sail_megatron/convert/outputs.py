"""Output folders that appear whole or not at all, and the small files that travel with the weights."""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List

from sail_megatron.convert.errors import ConversionError
from sail_megatron.training.disk_errors import free_space, output_failure, write_errors

# Not carried as "side files": the weights and configs we rewrite ourselves.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_REWRITTEN = ("config.json",)
_SIDE_FILE_LIMIT = 100 << 20
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def check_output_free(final: Path) -> None:
    """Refuse, before any work starts, an --out that is a file, a non-empty folder, or a path that cannot
    be created (an ancestor that is a file, a folder without write permission)."""
    final = Path(final)
    if final.is_file() or (final.exists() and not final.is_dir()):
        raise ConversionError(
            f"cannot write {final}", [f"{final} is a file, not a folder"], "choose a new --out folder"
        )
    if final.is_dir() and any(final.iterdir()):
        raise ConversionError(
            f"cannot write {final}",
            [f"{final} already exists and is not empty"],
            "choose a new --out folder or remove the old one",
        )
    parent = _nearest_existing(final.absolute().parent)
    if not parent.is_dir():
        raise ConversionError(
            f"cannot write {final}", [f"{parent} is a file, not a folder"], "choose an --out path under a folder"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(
            f"cannot write {final}",
            [f"no permission to create folders in {parent}"],
            "choose an --out path in a folder you can write",
        )


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _make_dir(path: Path, final: Path, parents: bool = False) -> None:
    """mkdir, with a failure reported as bad input naming the path (root passes the permission
    pre-check, yet read-only file systems still refuse)."""
    try:
        path.mkdir(parents=parents, exist_ok=parents)
    except OSError as e:
        raise ConversionError(
            f"cannot write {final}",
            [f"cannot create {e.filename or path}: {e.strerror or e}"],
            "choose an --out path in a folder you can write",
        ) from e


@contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yields a temporary sibling of `final` (hidden, named `.NAME.partial-PID`: no reader takes it for
    an output), renamed to `final` only when the block succeeds; on any error the temporary folder is
    removed, so a failed conversion leaves nothing behind. A write the filesystem refused (full, over
    quota, read-only: torch's and megatron's wrapped forms too) ends as one ConversionError naming
    `final` and the free space there."""
    final = Path(final).absolute()
    check_output_free(final)
    _make_dir(final.parent, final, parents=True)
    tmp = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    _make_dir(tmp, final)
    try:
        yield tmp
        if final.exists():
            final.rmdir()  # empty (checked above)
        os.replace(tmp, final)
    except write_errors() as e:
        cause = None if isinstance(e, ConversionError) else output_failure(e, tmp)  # before the space is freed
        shutil.rmtree(tmp, ignore_errors=True)
        if cause is None:
            raise
        raise _write_failed(final, tmp, cause) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_failed(final: Path, tmp: Path, cause: str) -> ConversionError:
    left = (
        f"the partial output is left in {tmp} (a name no reader takes for an output): delete it"
        if tmp.exists()
        else f"the partial output was removed: nothing was written at {final}"
    )
    return ConversionError(
        f"cannot write {final}",
        [f"{cause} ({free_space(final.parent)} now); {left}"],
        "free space there (or choose an --out on another filesystem) and run the command again",
    )


def side_files(folder: Path) -> List[Path]:
    """Small top-level files of a HF folder that are not weights or config.json: tokenizer, generation
    config, the InternVL-chat modelling code named by `auto_map`, README."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.name in _REWRITTEN:
            continue
        if p.name.endswith(_WEIGHT_SUFFIXES) or p.name.endswith(".index.json"):
            continue
        if p.stat().st_size > _SIDE_FILE_LIMIT:
            continue
        out.append(p)
    return out


def copy_files(files: List[Path], dest: Path) -> List[str]:
    """Copy `files` into `dest`; returns their names."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copy2(p, dest / p.name)
    return [p.name for p in files]


def tokenizer_files(folder: Path) -> List[Path]:
    """The tokenizer files present in `folder`."""
    return [Path(folder) / n for n in TOKENIZER_FILES if (Path(folder) / n).is_file()]
