"""Training one LoRA module on a task file with PEFT: how a hub for a new base model starts.

For both families (:mod:`lorahub_ray.core.families`): the examples become the family's loss batches
(for a causal LM, the loss on the answer and EOS only, as the search's objective sees them), PEFT
wraps the base model with a fresh LoRA (``r``, ``lora_alpha``, ``target_modules``; B starts at zero,
so step 0 is the base model), and AdamW runs ``steps`` steps over batches drawn from a seeded
shuffle of the examples (a new shuffle each epoch). The loss is the token mean of the batch. The
output is a standard PEFT adapter directory (``adapter_config.json`` naming the base model,
``adapter_model.safetensors``), written atomically; :func:`train_module` can add it to a hub
catalogue.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorahub_ray.core.families import check_template, family_of_model
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.modules import module_name
from lorahub_ray.errors import LoraHubError
from lorahub_ray.io import catalogue, storage
from lorahub_ray.io.examples import as_examples
from lorahub_ray.progress import progress_bar


@dataclass
class TrainResult:
    output: Path | str
    losses: list[float] = field(default_factory=list)  # the training loss of each step
    hub_rows: list[dict] = field(default_factory=list)


def batch_loss(family, model, batches) -> torch.Tensor:
    """Token-mean cross-entropy over the batches' label tokens (differentiable)."""
    total, count = 0.0, 0
    for batch in batches:
        logits, labels = family.logits_and_labels(model, batch)
        total = total + torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                          labels.reshape(-1), ignore_index=-100, reduction="sum")
        count += int((labels != -100).sum())
    return total / max(1, count)


def train_module(model: str, examples, output: str | Path, *, rank: int = 8, alpha: float | None = None,
                 targets: Sequence[str] | None = None, steps: int = 100, lr: float = 1e-3, batch_size: int = 8,
                 seed: int = 0, template: str = "plain", input_field: str = "input", output_field: str = "output",
                 device: str | None = None, max_length: int = 512, hub: str | None = None, task: str | None = None,
                 progress: bool = True, callback: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train one LoRA module for ``model`` (any base model ``--model`` takes) on ``examples`` and write
    it to ``output``; with ``hub``, add it to that catalogue under ``task``. ``targets`` default to the
    family's (``q``/``v`` for T5, ``q_proj``/``v_proj`` for Llama-like models); ``alpha`` to ``2·rank``.
    ``callback(step, loss)`` is called after every optimizer step (``step`` from 1)."""
    from peft import LoraConfig, get_peft_model

    data = as_examples(examples, input_field=input_field, output_field=output_field)
    for name, value in (("rank", rank), ("steps", steps), ("batch size", batch_size)):
        if value < 1:
            raise LoraHubError(f"{name} must be at least 1, got {value}")
    if lr <= 0:
        raise LoraHubError(f"learning rate must be positive, got {lr}")
    check_template(template)
    storage.check_output(output, marker=storage.ADAPTER_CONFIG)
    if hub is not None:  # a broken catalogue, or one that holds this id already, fails before the training
        ids = {r["id"] for r in catalogue.read_catalogue(hub, missing_ok=True)}
        if module_name(str(output)) in ids:
            raise LoraHubError(f"hub catalogue '{hub}' already holds a module '{module_name(str(output))}'; "
                               "choose another --output name")
    with progress_bar("loading the base model", None, enabled=progress):
        base, tokenizer, _ = load_base_model(model, device=device)
    check_template(template, tokenizer)
    family = family_of_model(base)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank, lora_dropout=0.0,
                        target_modules=list(targets or family.default_targets), task_type=family.task_type)
    try:
        peft_model = get_peft_model(base, config)
    except ValueError as exc:
        raise LoraHubError(f"--targets {','.join(config.target_modules)}: {str(exc).splitlines()[0]}") from None
    device = next(base.parameters()).device
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses = []
    with progress_bar(f"training ({family.name}, r={rank})", steps, enabled=progress) as advance:
        for _ in range(steps):
            picked = []
            while len(picked) < min(batch_size, len(data)):
                if not order:
                    order = torch.randperm(len(data), generator=generator).tolist()
                picked.append(order.pop())
            batches = family.loss_batches(tokenizer, [data.inputs[i] for i in picked], [data.outputs[i] for i in picked],
                                          batch_size=None, device=device, max_length=max_length, template=template)
            loss = batch_loss(family, peft_model, batches)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
            advance(info=f"loss {losses[-1]:.4f}")
            if callback is not None:
                callback(len(losses), losses[-1])
    peft_model.eval()
    with progress_bar("writing the adapter", None, enabled=progress), \
            storage.output_directory(output, marker=storage.ADAPTER_CONFIG) as tmp:
        peft_model.save_pretrained(tmp)
        cfg_file = tmp / storage.ADAPTER_CONFIG
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = str(model)  # what the user named, not a cache directory
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    saved = str(output) if storage.is_remote(str(output)) else Path(output)
    rows = catalogue.add(hub, [str(saved)], task=task) if hub is not None else []
    return TrainResult(saved, losses, rows)
