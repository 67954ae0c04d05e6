"""Tiny models and LoRA modules built offline for the tests."""

from __future__ import annotations

import ctypes
import json
import signal
import sys
from pathlib import Path

import torch

BASE_ID = "tests/tiny-t5"


def make_base(path: Path, *, seed: int = 0, d_model: int = 32) -> Path:
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tok = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                      num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_module(base: Path, path: Path, *, seed: int, r: int = 4, targets=("q", "v"), scale: float = 0.5,
                alpha: int | None = None, base_id: str = BASE_ID, safetensors: bool = True) -> Path:
    """A LoRA module with random A and B (PEFT would start B at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(seed)
    model = T5ForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(targets), task_type="SEQ_2_SEQ_LM",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(path, safe_serialization=safetensors)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = base_id
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return path


def assert_same_weights(model, other) -> None:
    """Two models hold the same parameters: same names, same shapes, same values (to float32 round-off)."""
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


EXAMPLES = [
    {"input": "reverse: abc", "output": "cba"},
    {"input": "reverse: hello", "output": "olleh"},
    {"input": "reverse: xy", "output": "yx"},
    {"input": "reverse: lora", "output": "arol"},
    {"input": "reverse: ray", "output": "yar"},
]


_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None  # looked up before any fork


def end_with_this_process() -> None:
    """In a child, before it runs: SIGTERM when this (pytest) process ends, however it ends. pytest-timeout
    ends a hung run with os._exit, which runs no fixture teardown; ``ray start --block`` stops its Ray
    processes on SIGTERM, so the session's head does not outlive the run. (Linux only; elsewhere a no-op.)"""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
