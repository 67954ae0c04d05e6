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


# every port a Ray node binds, so that none is left to Ray's own random pick
RAY_PORT_FLAGS = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                  "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")
PORT_CLASH = "is trying to use a port number"


def ray_port_args(*, head: bool = True) -> tuple[list[str], dict[str, int]]:
    """``ray start`` arguments that give every component its own free port (chosen together, see
    :func:`ports.free_ports`); a worker node takes no GCS or dashboard port."""
    from ports import free_ports

    flags = RAY_PORT_FLAGS if head else RAY_PORT_FLAGS[2:]
    ports = dict(zip(flags, free_ports(len(flags))))
    return [f"--{flag}={port}" for flag, port in ports.items()], ports


def head_log_line(text: str) -> str:
    """The line of a head's log that says why it died (the last error, else the last line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "rror" in line or PORT_CLASH in line]
    return (errors or lines or ["(empty log)"])[-1]


def start_ray_head(log, env: dict, *, num_cpus: int, timeout: float, attempts: int = 2):
    """``ray start --head --block`` on loopback in its own process group (ended with pytest, see
    :func:`end_with_this_process`), every port chosen free; waits for its dashboard, the last thing a head
    starts. A head that dies of a port clash (another process took a port between our pick and Ray's
    bind) is started again once, with new ports. Returns ``(process, gcs_address, dashboard_port)``; the
    caller ends the group by its pid. A head that does not start raises with the log line that says why."""
    import socket
    import subprocess
    import time

    for attempt in range(1, attempts + 1):
        offset = os.lseek(log.fileno(), 0, os.SEEK_CUR)  # the child writes through the same file
        args, ports = ray_port_args()
        head = subprocess.Popen(
            [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", f"--num-cpus={num_cpus}",
             "--num-gpus=0", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", *args,
             "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=end_with_this_process)
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", ports["dashboard-port"]), timeout=1).close()
                return head, f"127.0.0.1:{ports['port']}", ports["dashboard-port"]
            except OSError:
                if head.poll() is None and time.monotonic() <= deadline:
                    time.sleep(0.5)
                    continue
            if head.poll() is None:  # timed out: end what did start
                os.killpg(head.pid, signal.SIGKILL)
                head.wait()
            log.flush()
            text = Path(log.name).read_bytes()[offset:].decode(errors="replace")
            if PORT_CLASH in text and attempt < attempts:
                break  # again, with new ports
            raise RuntimeError(f"ray head did not start (attempt {attempt}): {head_log_line(text)} "
                               f"(the whole log: {log.name})") from None
