"""Models by Hugging Face name from the local cache (HF_HUB_OFFLINE=1, after a first
download): optional files may be absent; config.json's file names (Kyutai's moshi_name,
mimi_name, tokenizer_name) are the ones read, by name and from a local folder alike."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from personaplex_fast.checkpoint import CheckpointError
from personaplex_fast.config import MIMI_WEIGHTS, TEXT_TOKENIZER
from personaplex_fast.loading import load_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
RENAMED = {"model.safetensors": "lm-7b.safetensors", MIMI_WEIGHTS: "mimi.safetensors",
           TEXT_TOKENIZER: "spm.model"}


def cached_repo(hub, repo: str, files: dict) -> None:
    """`repo` as huggingface_hub caches it under `hub` (HF_HUB_CACHE): a snapshot of `files`."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name, src in files.items():
        if isinstance(src, str):
            (snapshot / name).write_text(src)
        else:
            shutil.copy(src, snapshot / name)


def renamed(tiny) -> dict:
    """The tiny model under other file names, which its config.json gives as Kyutai's do."""
    config = json.loads((tiny / "config.json").read_text()) | {
        "moshi_name": RENAMED["model.safetensors"], "mimi_name": RENAMED[MIMI_WEIGHTS],
        "tokenizer_name": RENAMED[TEXT_TOKENIZER], "model_type": "moshi"}
    return {RENAMED.get(f.name, f.name): f for f in tiny.iterdir() if f.name != "config.json"} | {
        "config.json": json.dumps(config)}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_offline_without_an_optional_file(tmp_path, tiny):
    """The README's offline example by repo name, from the cache, HF_HUB_OFFLINE=1, with the
    text tokenizer (optional: no text prompt here) never downloaded."""
    hub = tmp_path / "hf" / "hub"
    cached_repo(hub, "acme/tiny", {f.name: f for f in tiny.iterdir() if f.name != TEXT_TOKENIZER})
    wav = tmp_path / "q.wav"
    sf.write(str(wav), 0.1 * np.sin(np.arange(24000) / 10).astype(np.float32), 24000)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "PERSONAPLEX_FAST_CACHE": str(tmp_path / "cache")}
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "personaplex_fast.cli", "offline", "--model", "acme/tiny", "--input-wav", str(wav),
         "--output-wav", str(tmp_path / "r.wav"), "--output-text", str(tmp_path / "r.json"), *extra],
        env=env, capture_output=True, text=True, timeout=300)
    proc = run("--voice-prompt", "NATF2")
    assert proc.returncode == 0, proc.stderr
    assert sf.info(str(tmp_path / "r.wav")).frames == 24000
    proc = run("--text-prompt", "Be kind.")  # now the missing file is needed: one line
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "no text tokenizer" in proc.stderr, proc.stderr


def test_a_needed_file_missing_offline_is_one_line(offline, tiny):
    cached_repo(offline, "acme/nocodec", {f.name: f for f in tiny.iterdir() if f.name != MIMI_WEIGHTS})
    with pytest.raises(CheckpointError, match=f"acme/nocodec: cannot download {MIMI_WEIGHTS}: .*HF_HUB_OFFLINE"):
        load_model("acme/nocodec")


def test_config_file_names_by_repo_name_and_folder(offline, tiny, tmp_path):
    files = renamed(tiny)
    cached_repo(offline, "acme/renamed", files)
    by_name = load_model("acme/renamed")
    folder = tmp_path / "local"
    cached_repo(tmp_path / "plain", "x/y", files)
    shutil.copytree(tmp_path / "plain" / "models--x--y" / "snapshots" / COMMIT, folder)
    by_folder = load_model(folder)
    for model in (by_name, by_folder):
        assert model.files.lm == "lm-7b.safetensors" and model.files.tokenizer == "spm.model"
        assert model.tokenizer is not None and model.decode_text(300)  # the renamed tokenizer is read
        assert model.lm.cfg.dim == 128


@pytest.mark.parametrize("name, error", [
    ("../model.safetensors", "moshi_name must be a file name in the model's folder"),
    ("hf://kyutai/other/model.safetensors", "is a file of another repo"),
    (5, "moshi_name must be a file name"),
])
def test_bad_file_names_are_refused(tmp_path, tiny, name, error):
    shutil.copytree(tiny, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text()) | {"moshi_name": name}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=error):
        load_model(tmp_path / "m")
