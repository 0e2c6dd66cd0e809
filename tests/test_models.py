"""Offline models: the embedded SmolLM2 folder and tiny random Llamas."""

import json

import pytest

from tkernels import models


def test_tiny_llama_builds_once_and_loads(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TKERNELS_CACHE", str(tmp_path))
    path = models.tiny_llama_dir()
    assert models.tiny_llama_dir() == path
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tiny")], "temporary folder left behind"
    config = json.loads((path / "config.json").read_text())
    assert config["head_dim"] >= 32
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok.apply_chat_template([{"role": "user", "content": "Simple is better"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], config["vocab_size"])


def test_tiny_llama_rejects_small_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        models.tiny_llama_dir(hidden=32, heads=2)


def test_failed_build_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TKERNELS_CACHE", str(tmp_path))

    def broken(out):
        (out / "half-written").write_text("x")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        models._build_once("broken", broken)
    assert list((tmp_path / "models").iterdir()) == [tmp_path / "models" / "broken.lock"]


@pytest.mark.slow
def test_smollm2_is_a_plain_llama_folder():
    path = models.smollm2_dir()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
