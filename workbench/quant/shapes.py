"""Model shapes and tiny source models: the dimensions synthetic checkpoints are drawn with.

`SHAPES` names real architectures' dimensions (`ShapeSpec`, which also builds the matching
transformers config). `make_tiny_source_model` writes a tiny random bf16 Llama with a real (tiny) BPE
tokenizer, the input that fast tests of the quantize path use; `write_wordlevel_tokenizer` writes the
one-word-per-id tokenizer of speed runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "SHAPES",
    "ShapeSpec",
    "make_tiny_source_model",
    "write_tiny_tokenizer",
    "write_wordlevel_tokenizer",
]


@dataclass(frozen=True)
class ShapeSpec:
    architecture: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    max_positions: int = 4096
    rms_eps: float = 1e-5

    def hf_config(self) -> dict:
        """A real transformers config dict for this shape (so loaders read it as they would a hub one)."""
        return self.hf_config_object().to_dict()

    def hf_config_object(self):  # -> transformers.PretrainedConfig
        from transformers import LlamaConfig, Qwen2Config

        common = dict(
            hidden_size=self.hidden,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tie_embeddings,
            rope_theta=self.rope_theta,
            max_position_embeddings=self.max_positions,
            rms_norm_eps=self.rms_eps,
            architectures=[self.architecture],
            dtype="bfloat16",
            bos_token_id=0,
            eos_token_id=0,
        )
        if self.architecture == "Qwen2ForCausalLM":
            return Qwen2Config(**common)
        return LlamaConfig(**common, attention_bias=self.qkv_bias)


SHAPES: dict[str, ShapeSpec] = {
    "tiny-llama": ShapeSpec("LlamaForCausalLM", 64, 128, 2, 4, 2, 256),
    # The smallest shape vLLM's GPU attention takes (head_dim 64) and W4A16 group 128 divides.
    "mini-llama": ShapeSpec("LlamaForCausalLM", 256, 768, 2, 4, 2, 256),
    "smollm2-135m": ShapeSpec(
        "LlamaForCausalLM",
        576,
        1536,
        30,
        9,
        3,
        49152,
        tie_embeddings=True,
        rope_theta=100000.0,
        max_positions=8192,
    ),
    "llama3-8b": ShapeSpec(
        "LlamaForCausalLM", 4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0, max_positions=8192
    ),
    "qwen2-7b": ShapeSpec(
        "Qwen2ForCausalLM",
        3584,
        18944,
        28,
        28,
        4,
        152064,
        qkv_bias=True,
        rope_theta=1000000.0,
        max_positions=32768,
        rms_eps=1e-6,
    ),
}


def write_wordlevel_tokenizer(out_dir: Path, vocab_size: int) -> Path:
    """A tokenizer with one word per id ("t0".."tN", whitespace-split), so a server can decode every
    id of the model and a prompt of N words is N tokens. t0 is bos/eos/pad, t1 unk."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab_size)}, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # single_word: else the special "t1" would match inside "t17" (special tokens are cut out first)
    t0, t1 = (AddedToken(t, single_word=True, special=True, normalized=False) for t in ("t0", "t1"))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=t0, bos_token=t0, pad_token=t0, unk_token=t1
    )
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def write_tiny_tokenizer(out_dir: Path, vocab_size: int = 256) -> Path:
    """Train a tiny BPE tokenizer (ids < `vocab_size`) on Python's own docs text and save it.

    Real tokenizer files (tokenizer.json + config) for tiny test models, with no download.
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Metaspace keeps spaces as a symbol so decode() gives readable text back.
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<unk>"],
        limit_alphabet=100,
        show_progress=False,
    )
    tok.train_from_iterator(list(topics.values()), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<unk>",
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


def make_tiny_source_model(out_dir: Path, *, seed: int = 0, shapes: str = "tiny-llama") -> Path:
    """A random bf16 HF model folder (config, safetensors, tokenizer) with `shapes`' dimensions."""
    from transformers import AutoModelForCausalLM

    config = SHAPES[shapes].hf_config_object()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    write_tiny_tokenizer(out_dir, vocab_size=min(config.vocab_size, 256))
    return out_dir
