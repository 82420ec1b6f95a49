"""Special-token ids read straight from tokenizer files (no tokenizer library, no network)."""

import json
from pathlib import Path
from typing import Optional

IMG_CONTEXT = "<IMG_CONTEXT>"


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def find_token_id(folder: Optional[Path], token: str = IMG_CONTEXT) -> Optional[int]:
    """The id of added token `token` in a Hugging Face tokenizer folder, or None when absent."""
    if folder is None:
        return None
    folder = Path(folder)
    tok = _load(folder / "tokenizer.json")
    if isinstance(tok, dict):
        for entry in tok.get("added_tokens") or []:
            if entry.get("content") == token:
                return int(entry["id"])
        vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and token in vocab:
            return int(vocab[token])
    config = _load(folder / "tokenizer_config.json")
    if isinstance(config, dict):
        for tid, entry in (config.get("added_tokens_decoder") or {}).items():
            if isinstance(entry, dict) and entry.get("content") == token:
                return int(tid)
    added = _load(folder / "added_tokens.json")
    if isinstance(added, dict) and token in added:
        return int(added[token])
    return None
