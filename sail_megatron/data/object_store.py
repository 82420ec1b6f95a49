"""Dataset paths in an object store: `msc://PROFILE/path` URLs, read through energon's EPath and the
Multi-Storage Client (MSC). The profile (endpoint, bucket, retries, timeouts) comes from the MSC config file
named by the MSC_CONFIG environment variable (else ~/.msc_config.yaml); credentials come from that
profile's `credentials_provider` or the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never
from a recipe.

`check_store_path` is `check_dataset_path` for such a URL: the same questions asked of the store, with
errors that name the field, the URL and the fix. `StoreErrorsNamed` is the training loader for such a
path: a read that fails for good (after MSC's retries) stops training with an error naming the URL,
never a skipped shard."""

import os
from typing import Optional

import yaml

from sail_megatron.config import ConfigError

PREFIX = "msc://"
_BLEND_LIMIT = 16 << 20


def is_store_url(path: object) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def msc_config_said() -> str:
    where = os.environ.get("MSC_CONFIG")
    return f"MSC_CONFIG={where}" if where else "MSC_CONFIG unset (so ~/.msc_config.yaml)"


def _profile(url: str) -> str:
    return url[len(PREFIX) :].split("/", 1)[0]


def _reason(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1]}" if lines else type(e).__name__


def _epath(url: str, field: str):
    from megatron.energon.epathlib import EPath

    try:
        return EPath(url)
    except ValueError as e:
        if "not found" not in str(e):
            raise ConfigError(
                field, f"{url}: {_reason(e)}", f"fix profile {_profile(url)!r} in the MSC config"
            ) from None
        raise ConfigError(
            field,
            f"{url}: no MSC profile {_profile(url)!r} ({msc_config_said()})",
            f"set MSC_CONFIG to an MSC config file whose `profiles:` has {_profile(url)!r} "
            "(storage_provider type s3 with endpoint_url and base_path: BUCKET/PREFIX); see README, Data",
        ) from None


def _unreachable(url: str, field: str, e: BaseException) -> ConfigError:
    return ConfigError(
        field,
        f"{url}: the object store did not answer ({_reason(e)})",
        f"check the endpoint_url and credentials of MSC profile {_profile(url)!r} ({msc_config_said()}; "
        "credentials from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile's credentials_provider)",
    )


def check_store_path(url: str, field: str, fix: str) -> None:
    """An energon dataset folder (with `.nv-meta/`) or a blend YAML in an object store."""
    p = _epath(url, field)
    try:
        if p.is_dir():
            if not (p / ".nv-meta").is_dir():
                raise ConfigError(field, f"{url} is not a prepared dataset (no .nv-meta folder)", fix)
            if not (p / ".nv-meta" / "dataset.yaml").is_file():
                raise ConfigError(field, f"{url} is not a usable prepared dataset: .nv-meta has no dataset.yaml", fix)
            return
        if not p.is_file():
            raise ConfigError(field, f"{url} does not exist", fix + " (upload the whole folder, .nv-meta included)")
        if p.size() > _BLEND_LIMIT:
            raise ConfigError(field, f"{url} is neither a dataset folder nor a blend YAML (over 16 MiB)", fix)
        text = p.read_bytes().decode("utf-8")
    except ConfigError:
        raise
    except Exception as e:  # the store's own errors: network, permissions, timeouts after MSC's retries
        raise _unreachable(url, field, e) from None
    try:
        blend = yaml.safe_load(text)
    except yaml.YAMLError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(field, f"{url} is neither a dataset folder nor a blend YAML ({reason})", fix) from None
    if not isinstance(blend, dict) or "splits" not in blend:
        raise ConfigError(field, f"{url} is not a blend: an energon metadataset YAML has a 'splits' section", fix)


def check_store_valid_split(url: str, field: str, said: str, fix: str) -> None:
    """The `val` split of a prepared folder in an object store holds samples; a blend YAML there has a
    `val` split (what its datasets hold is left to energon)."""
    check_store_path(url, field, fix)
    p = _epath(url, field)
    try:
        if p.is_dir():
            if not store_split_samples(url, "val"):
                raise ConfigError(field, f"{said}{url} has no samples in its val split", fix)
            return
        blend = yaml.safe_load(p.read_bytes().decode("utf-8"))
    except ConfigError:
        raise
    except Exception as e:
        raise _unreachable(url, field, e) from None
    if not isinstance(blend.get("splits"), dict) or blend["splits"].get("val") is None:
        raise ConfigError(field, f"{said}{url} has no val split", fix)


def store_split_samples(url: str, part: str) -> int:
    """Samples in one split of a prepared folder in an object store, as energon counts them."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.empty_dataset_error import EmptyDatasetError
    from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

    try:
        meta = WebdatasetMeta.from_config(EPath(url), split_part=part)
    except EmptyDatasetError:
        return 0
    return sum(shard.count for shard in meta.shards)


def store_name(url: str) -> str:
    """The last part of the URL (a YAML file by its stem), for a validation source's name."""
    last = url.rstrip("/").rsplit("/", 1)[-1]
    return last.rsplit(".", 1)[0] if last.endswith((".yaml", ".yml")) else last


class DataReadError(RuntimeError):
    """Reading the dataset failed for good (the object store went away): training stops, nothing is skipped."""


def read_error(url: str, field: str, e: BaseException) -> DataReadError:
    return DataReadError(
        f"{field} {url}: reading from the object store failed ({_reason(e)}); MSC retried as profile "
        f"{_profile(url)!r} says ({msc_config_said()}: its `retry` and the storage_provider's timeouts). "
        "Training stops rather than skip data: check the store, then resume from the last checkpoint"
    )


_STORE_ERRORS: Optional[tuple] = None


def store_errors() -> tuple:
    """The exceptions a failing object store raises through MSC (after its retries) and botocore."""
    global _STORE_ERRORS
    if _STORE_ERRORS is None:
        from multistorageclient.types import RetryableError

        errors = [RetryableError, OSError]
        try:
            from botocore.exceptions import BotoCoreError, ClientError

            errors += [BotoCoreError, ClientError]
        except ImportError:  # pragma: no cover (MSC's s3 provider brings botocore)
            pass
        _STORE_ERRORS = tuple(errors)
    return _STORE_ERRORS
