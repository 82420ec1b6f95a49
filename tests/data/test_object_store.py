"""Datasets in an object store (`msc://PROFILE/path`, energon's EPath over the Multi-Storage Client): a local
S3 server (moto) holds a prepared dataset and a blend; the path checks ask it the same questions as of a
local folder, the training loader reads the same batches as from the local copy and resumes from a saved
state, and a server that goes away mid-epoch stops reading with an error naming the URL, in bounded time."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from sail_megatron.config import ConfigError
from sail_megatron.config.data import DataConfig
from sail_megatron.data.blend import write_blend
from sail_megatron.data.dataset_path import check_dataset_path, check_valid_split
from sail_megatron.data.object_store import DataReadError
from sail_megatron.data.valid_sources import valid_sources
from tests.data.test_loader import _loader, tokenizer_dir, two_datasets  # noqa: F401 (fixtures)
from tests.helpers.loader_workers import stop_loader_workers

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "sail-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _profile(endpoint: str) -> dict:
    return {
        "storage_provider": {
            "type": "s3",
            "options": {
                "base_path": BUCKET,
                "endpoint_url": endpoint,
                "region_name": "us-east-1",
                # Low, so that a server gone away fails the test's reads in seconds (defaults: minutes).
                "connect_timeout": 1,
                "read_timeout": 2,
                "retries": {"max_attempts": 1},
            },
        },
        "retry": {"attempts": 2, "delay": 0.1, "backoff_multiplier": 1.0},
    }


@pytest.fixture(scope="module")
def store(two_datasets, tmp_path_factory):  # noqa: F811
    """Two servers on one moto backend (both see the bucket): `s3-data` stays up, `s3-gone` is stopped by
    the test that needs a server going away. Credentials come from the environment, as in production."""
    write_blend(two_datasets / "mix.yaml", {"captions": 1.0, "sft": 1.0})
    saved = {k: os.environ.get(k) for k in ("MSC_CONFIG", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ["AWS_ACCESS_KEY_ID"] = "test-key-id"
    os.environ["AWS_SECRET_ACCESS_KEY"] = "test-secret"
    servers = {}
    for name in ("s3-data", "s3-gone"):
        port = _free_port()
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        servers[name] = (server, f"http://127.0.0.1:{port}")
    s3 = boto3.client("s3", endpoint_url=servers["s3-data"][1], region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    for f in sorted(two_datasets.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), BUCKET, f"sail/{f.relative_to(two_datasets).as_posix()}")
    config = tmp_path_factory.mktemp("msc") / "msc_config.json"
    config.write_text(json.dumps({"profiles": {name: _profile(url) for name, (_, url) in servers.items()}}))
    os.environ["MSC_CONFIG"] = str(config)
    yield servers
    for server, _ in servers.values():
        try:
            server.stop()
        except Exception:  # already stopped by the test
            pass
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_store_paths_are_checked_in_the_store(store):
    check_dataset_path("msc://s3-data/sail/sft")
    check_dataset_path("msc://s3-data/sail/mix.yaml", "data.valid_path")
    with pytest.raises(ConfigError, match=r"data.path.*msc://s3-data/sail/nothing does not exist"):
        check_dataset_path("msc://s3-data/sail/nothing")
    s3 = boto3.client("s3", endpoint_url=store["s3-data"][1], region_name="us-east-1")
    s3.put_object(Bucket=BUCKET, Key="sail/unprepared/shard-000000.tar", Body=b"x")
    with pytest.raises(ConfigError, match=r"no \.nv-meta folder"):
        check_dataset_path("msc://s3-data/sail/unprepared")
    with pytest.raises(ConfigError, match=r"no MSC profile 'nope' \(MSC_CONFIG=.*msc_config.json\).*set MSC_CONFIG"):
        check_dataset_path("msc://nope/sail/sft", "data.valid_path")
    with pytest.raises(ConfigError, match=r"data.valid_path.*no samples in its val split"):
        check_valid_split("msc://s3-data/sail/sft", "data.valid_path")
    # A URL is one validation source, named by its last part (a blend there is scored as a whole).
    paths = ["msc://s3-data/sail/mix.yaml", "msc://s3-data/other/mix.yaml"]
    assert [s.name for s in valid_sources(DataConfig(valid_path=paths))] == ["mix", "mix-2"]


def _keys_and_tokens(loader, n):
    it = iter(loader)
    batches = [next(it) for _ in range(n)]
    return [b.keys for b in batches], [b.tokens for b in batches]


def test_store_reads_like_local_and_resumes(store, two_datasets, tokenizer_dir):  # noqa: F811
    def build(path, state=None):
        return _loader(path, tokenizer_dir, num_workers=1, shuffle=8, packing=True, buffer=8, state=state)

    local_keys, local_tokens = _keys_and_tokens(build(two_datasets / "sft"), 10)
    stop_loader_workers()  # the local loader's: the remote one reads alone
    remote = build("msc://s3-data/sail/sft")
    it = iter(remote)
    first = [next(it) for _ in range(4)]
    state = remote.save_state_rank()  # mid-epoch: 12 samples, about 2 per packed row
    rest = [next(it) for _ in range(6)]
    remote_keys = [b.keys for b in first + rest]
    assert remote_keys == local_keys
    assert all(torch.equal(a.tokens, b) for a, b in zip(first + rest, local_tokens))
    resumed_keys, _ = _keys_and_tokens(build("msc://s3-data/sail/sft", state=state), 6)
    assert resumed_keys == [b.keys for b in rest]


def test_store_blend_reads_both_datasets(store, tokenizer_dir):  # noqa: F811
    keys, _ = _keys_and_tokens(_loader("msc://s3-data/sail/mix.yaml", tokenizer_dir, shuffle=8), 16)
    assert {k[0].split("/")[0] for k in keys} == {"captions", "sft"}


def test_store_going_away_is_a_clear_error(store, tokenizer_dir):  # noqa: F811
    url = "msc://s3-gone/sail/sft"
    it = iter(_loader(url, tokenizer_dir, num_workers=1, shuffle=8))
    for _ in range(3):
        next(it)
    store["s3-gone"][0].stop()
    start = time.monotonic()
    with pytest.raises(DataReadError) as caught:
        for _ in range(1000):  # an endless loader: each new epoch reads the shards again
            next(it)
    took = time.monotonic() - start
    message = str(caught.value)
    assert url in message and "reading from the object store failed" in message, message
    assert "MSC_CONFIG=" in message and "resume from the last checkpoint" in message, message
    assert took < 30, f"the error took {took:.0f} s"


def test_the_trainer_trains_from_the_store(store, tokenizer_dir, tmp_path):  # noqa: F811
    """sail-train on an msc:// blend, credentials and the MSC config from the environment only."""
    from tests.helpers.train_cli import printed_losses, train_command

    recipe = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny" / "demo.yaml"
    overrides = [
        "data.path=msc://s3-data/sail/mix.yaml",
        f"data.tokenizer={tokenizer_dir}",
        "parallel.tensor_model_parallel_size=1",
        "parallel.pipeline_model_parallel_size=1",
        "run.global_batch_size=2",
        "run.train_steps=2",
        "run.eval_interval=0",
        "run.plot=false",
        "data.num_workers=1",
        f"run.save_dir={tmp_path / 'run'}",
    ]
    out = subprocess.run(
        train_command(recipe, overrides),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    losses = printed_losses(out.stdout)
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    assert "test-secret" not in (tmp_path / "run" / "config.yaml").read_text()
