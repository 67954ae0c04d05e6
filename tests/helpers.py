"""Tiny models and LoRA modules built offline for the tests."""

from __future__ import annotations

import ctypes
import json
import os
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
# --- a tiny causal LM (Llama architecture, grouped-query attention) ----------------------------------

LLAMA_ID = "tests/tiny-llama"
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_byte_tokenizer(*, chat: bool = False):
    """A byte-level BPE tokenizer built offline that adds BOS and no EOS, and has no pad token (as
    Llama's); with ``chat``, a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=specials[3:])
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def make_llama_base(path: Path, *, seed: int = 0, chat: bool = False) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_byte_tokenizer(chat=chat)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_llama_module(base: Path, path: Path, *, seed: int, r: int = 4, targets=LLAMA_TARGETS, scale: float = 0.3,
                      base_id: str = LLAMA_ID) -> Path:
    """A CAUSAL_LM LoRA module with random A and B on ``targets`` of the tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM.from_pretrained(base)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), task_type="CAUSAL_LM",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * scale)
    peft_model.save_pretrained(path)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = base_id
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return path


def start_ray_head(log, env: dict, *, num_cpus: int, timeout: float):
    """``ray start --head --block`` on loopback in its own process group (ended with pytest, see
    :func:`end_with_this_process`), with free ports; waits for its dashboard, the last thing a head
    starts. Returns ``(process, gcs_address, dashboard_port)``; the caller ends the group by its pid."""
    import socket
    import subprocess
    import time

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    port, dash, agent = free_port(), free_port(), free_port()
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--num-cpus={num_cpus}",
         "--num-gpus=0", f"--port={port}", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}",  # the default, 52365, is taken by any other head here
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=end_with_this_process)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", dash), timeout=1).close()
            return head, f"127.0.0.1:{port}", dash
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                if head.poll() is None:  # timed out: end what did start
                    os.killpg(head.pid, signal.SIGKILL)
                raise RuntimeError(f"ray head did not start; see {log.name}") from None
            time.sleep(0.5)
