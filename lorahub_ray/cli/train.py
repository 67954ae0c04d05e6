"""``lorahub-ray train``: train one LoRA module on a task file with PEFT (seq2seq or causal LM)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lorahub_ray.cli.app import (DeviceOpt, InputFieldOpt, OutputFieldOpt, SeedOpt, app, console, fail_cleanly,
                                 quiet_libraries)


@app.command()
@fail_cleanly
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model, seq2seq or causal LM: Hub id, local directory, s3:// URI or .gguf file.")],
    data: Annotated[str, typer.Option("--data", "-d", help="The task's training examples: JSON Lines, Parquet or CSV with input/output fields, local or s3://.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Adapter directory to write (adapter_config.json naming the base model, adapter_model.safetensors), local or s3://.")],
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (default: 2 × rank).")] = None,
    targets: Annotated[Optional[str], typer.Option(help="Comma-separated Linear layers to adapt (default: q,v for T5; q_proj,v_proj for Llama-like models).")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    seed: SeedOpt = 0,
    template: Annotated[str, typer.Option(help="'plain' or 'chat' (the tokenizer's chat template; use the same in search).")] = "plain",
    hub: Annotated[Optional[str], typer.Option(help="Add the trained module to this hub catalogue (Parquet, local or s3://).")] = None,
    task: Annotated[Optional[str], typer.Option(help="With --hub: the module's task label (default: its id, the output's name).")] = None,
    input_field: InputFieldOpt = "input",
    output_field: OutputFieldOpt = "output",
    device: DeviceOpt = None,
):
    """Train one LoRA module on a task with PEFT, the way a hub for a new base model starts.

    Example:

        lorahub-ray train -m SmolLM2-135M-Instruct.Q4_1.gguf -d task.jsonl \\
            -o hub/task --steps 150 --hub hub.parquet
    """
    quiet_libraries()
    from lorahub_ray.core.train import train_module

    result = train_module(model, data, output, rank=rank, alpha=alpha,
                          targets=[t for t in (targets or "").split(",") if t] or None, steps=steps, lr=lr,
                          batch_size=batch_size, seed=seed, template=template, input_field=input_field,
                          output_field=output_field, device=device, hub=hub, task=task)
    console.print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f} over {len(result.losses)} steps; "
                  f"wrote {result.output}" + (f" and added it to {hub}" if hub else ""), highlight=False)
