"""Model families: the one seam between LoraHub and the kind of model it composes for.

A family is picked from the model's config (:func:`family_of`): :data:`SEQ2SEQ` for encoder-decoder
models (Flan-T5), :data:`CAUSAL` for decoder-only causal LMs (Llama, SmolLM2, Qwen, ...). It owns
loading, the PEFT task type of its adapters, turning examples into loss batches, the alignment of
logits with labels, and generation. Nothing else in the package asks which kind a model is.

The causal contract
    The model sees the ``input`` tokens (tokenised *with* the tokenizer's special tokens), then the
    ``output`` tokens (*without* them), then EOS. The loss covers the output tokens and EOS only: the
    prompt and padding positions are labelled -100. Loss batches are right-padded; the logits are
    computed only from the first answer position on (``logits_to_keep``), shifted by one against the
    labels. Generation is batched with LEFT padding and its attention mask (transformers derives the
    positions from it), the pad token is EOS when the tokenizer has none, and only the new tokens are
    returned, up to EOS.

Templates (:data:`TEMPLATES`, in the torch-free :mod:`lorahub_ray.core.templates`)
    ``plain``: the input text as it is. ``chat``: the tokenizer's chat template with the input as the
    user turn and a generation prompt for the assistant turn, whose content is the output (then EOS,
    which ends the assistant turn of instruct models such as SmolLM2). The rendered prompt already
    holds the template's special tokens, so it is tokenised without adding more.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from lorahub_ray.core.templates import TEMPLATES, check_template, prompt_ids, render  # noqa: F401  (re-exported)
from lorahub_ray.errors import IncompatibleModulesError, LoraHubError

Batch = dict[str, torch.Tensor]


class Family:
    """What differs between model kinds. Subclasses: :class:`Seq2SeqFamily`, :class:`CausalFamily`."""

    name = ""
    task_type = ""  # the PEFT task type of its adapters
    default_targets: tuple[str, ...] = ()

    def auto_class(self):
        raise NotImplementedError

    def load(self, path, *, dtype: torch.dtype | None = None, **kwargs):
        cls = self.auto_class()
        return cls.from_pretrained(path, dtype=dtype, **kwargs) if dtype else cls.from_pretrained(path, **kwargs)

    def prepare_tokenizer(self, tokenizer):
        """The tokenizer ready for this family (in place); returns it."""
        return tokenizer

    def check_module(self, module, model_type: str | None = None) -> None:
        """An adapter of another family is one clear error naming its ``adapter_config.json``."""
        task_type = (module.config.get("task_type") or "").upper()
        if task_type and task_type != self.task_type:
            raise IncompatibleModulesError(
                f"module '{module.name}' ({module.path / 'adapter_config.json'}) is a {task_type} adapter, but the "
                f"base model is a {self.name} model{f' ({model_type})' if model_type else ''} that needs "
                f"{self.task_type} adapters")

    def loss_batches(self, tokenizer, inputs: Sequence[str], outputs: Sequence[str], *, batch_size: int | None,
                     device="cpu", max_length: int = 2048, template: str = "plain") -> list[Batch]:
        raise NotImplementedError

    def logits_and_labels(self, model, batch: Batch, candidates: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [rows, T, V], labels [rows, T])`` aligned position by position, the batch's rows
        repeated ``candidates`` times, candidate-major."""
        raise NotImplementedError

    def generate(self, model, tokenizer, texts: Sequence[str], *, max_new_tokens: int, max_length: int = 2048,
                 template: str = "plain") -> list[str]:
        """Greedy generation for one batch; only the generated text of each input."""
        prompts = prompt_ids(tokenizer, texts, template, max_length=max_length)
        return [tokenizer.decode(row, skip_special_tokens=True)
                for row in self.generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens)]

    def generate_ids(self, model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     sampling: dict | None = None, stopping_criteria=None) -> list[list[int]]:
        """Generation for one batch of tokenised prompts (:func:`prompt_ids`): each row's new token ids, up to
        and without EOS. Greedy unless ``sampling`` gives ``{"temperature": t, "top_p": p}`` (t > 0; no top-k,
        as OpenAI's API). ``stopping_criteria``: a transformers ``StoppingCriteria`` also called at each step."""
        from transformers import StoppingCriteriaList

        if not prompts:
            return []
        self.prepare_tokenizer(tokenizer)
        device = next(model.parameters()).device
        inputs, start = self._generation_inputs(tokenizer, prompts)
        options = {"do_sample": False} if sampling is None else {
            "do_sample": True, "temperature": float(sampling["temperature"]), "top_p": float(sampling["top_p"]),
            "top_k": 0}
        if stopping_criteria is not None:
            options["stopping_criteria"] = StoppingCriteriaList([stopping_criteria])
        with torch.inference_mode():
            out = model.generate(**{k: v.to(device) for k, v in inputs.items()}, max_new_tokens=max_new_tokens,
                                 num_beams=1, **self._generation_ids(tokenizer), **options)
        rows = []
        for row in out[:, start:].cpu().tolist():
            if tokenizer.eos_token_id in row:  # stop at EOS (what follows is padding)
                row = row[: row.index(tokenizer.eos_token_id)]
            rows.append(row)
        return rows

    def _generation_inputs(self, tokenizer, prompts) -> tuple[Batch, int]:
        """The padded batch of ``prompts`` and the column where the generated tokens start in the output."""
        raise NotImplementedError

    def _generation_ids(self, tokenizer) -> dict:
        """Special token ids ``generate`` takes from the tokenizer (none: the model's own config)."""
        return {}


def _repeat(tensors: dict[str, torch.Tensor], candidates: int) -> dict[str, torch.Tensor]:
    if candidates <= 1:
        return tensors
    return {k: v.repeat(candidates, *([1] * (v.dim() - 1))) for k, v in tensors.items()}


def _sizes(n: int, batch_size: int | None) -> int:
    return n if batch_size is None else max(1, min(batch_size, n))


class Seq2SeqFamily(Family):
    """Encoder-decoder models: the input is the encoder's, the output the decoder's labels (the reference's batches)."""

    name = "seq2seq"
    task_type = "SEQ_2_SEQ_LM"
    default_targets = ("q", "v")

    def auto_class(self):
        from transformers import AutoModelForSeq2SeqLM

        return AutoModelForSeq2SeqLM

    def loss_batches(self, tokenizer, inputs, outputs, *, batch_size, device="cpu", max_length=2048,
                     template="plain"):
        """Batches as the reference builds them: padded inputs, padded labels with pad -> -100."""
        texts = render(tokenizer, inputs, template)
        size = _sizes(len(texts), batch_size)
        batches = []
        for start in range(0, len(texts), size):
            enc = tokenizer(texts[start : start + size], max_length=max_length, padding=True, truncation=True,
                            add_special_tokens=template == "plain", return_tensors="pt")
            labels = tokenizer(list(outputs[start : start + size]), max_length=max_length, padding=True,
                               truncation=True, return_tensors="pt")["input_ids"]
            labels[labels == tokenizer.pad_token_id] = -100
            batches.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device),
                            "labels": labels.to(device)})
        return batches

    def logits_and_labels(self, model, batch, candidates=1):
        """The labels replaced by the decoder inputs the model itself would shift from them, so that the
        forward skips its own loss (a second cross-entropy over the vocabulary costs about 0.5–1% of a
        Flan-T5-base-shaped step on CPU); the key/value cache skipped (about 2%)."""
        labels = batch["labels"]
        inputs = batch
        prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
        if prepare is not None and "decoder_input_ids" not in batch:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            inputs["decoder_input_ids"] = prepare(labels=labels)
        inputs = _repeat(inputs, candidates)
        return model(**inputs, use_cache=False).logits, labels.repeat(candidates, 1) if candidates > 1 else labels

    def _generation_inputs(self, tokenizer, prompts):
        # the encoder's inputs padded as the tokenizer pads them; the output starts with the decoder's start token
        enc = tokenizer.pad({"input_ids": [list(p) for p in prompts]}, padding=True, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, 1


class CausalFamily(Family):
    """Decoder-only causal LMs, under the causal contract of this module's docstring."""

    name = "causal"
    task_type = "CAUSAL_LM"
    default_targets = ("q_proj", "v_proj")

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def prepare_tokenizer(self, tokenizer):
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token is None:
                raise LoraHubError("the causal LM's tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def sequences(self, tokenizer, inputs, outputs, *, max_length=2048, template="plain"):
        """Each example's ``(ids, labels)``: prompt + output + EOS, the prompt labelled -100. A too long
        example loses the start of its prompt, never its answer."""
        self.prepare_tokenizer(tokenizer)
        prompts = prompt_ids(tokenizer, inputs, template, max_length=max_length)
        answers = tokenizer(list(outputs), add_special_tokens=False)["input_ids"]
        out = []
        for prompt, answer in zip(prompts, answers):
            answer = list(answer)[: max_length - 1] + [tokenizer.eos_token_id]
            prompt = prompt[max(0, len(prompt) + len(answer) - max_length):]
            out.append((prompt + answer, [-100] * len(prompt) + answer))
        return out

    def loss_batches(self, tokenizer, inputs, outputs, *, batch_size, device="cpu", max_length=2048,
                     template="plain"):
        seqs = self.sequences(tokenizer, inputs, outputs, max_length=max_length, template=template)
        size = _sizes(len(seqs), batch_size)
        batches = []
        for start in range(0, len(seqs), size):
            chunk = seqs[start : start + size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, (x, y) in enumerate(chunk):  # right padding: positions 0.. as without padding
                ids[row, : len(x)] = torch.tensor(x)
                labels[row, : len(y)] = torch.tensor(y)
                mask[row, : len(x)] = 1
            batches.append({"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)})
        return batches

    @staticmethod
    def _keeps_logits(model) -> bool:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return "logits_to_keep" in inspect.signature(base.forward).parameters

    def logits_and_labels(self, model, batch, candidates=1):
        """Logit ``t`` predicts token ``t + 1``; only the positions from the last prompt token of the
        shortest prompt on are computed (the full-vocabulary logits of the prompt cost ~20%)."""
        labels = batch["labels"]
        answer = (labels != -100).int().argmax(1)  # first label position of each row
        first = max(1, int(answer.min()))
        width = labels.shape[1]
        inputs = _repeat({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, candidates)
        if self._keeps_logits(model):
            logits = model(**inputs, use_cache=False, logits_to_keep=width - first + 1).logits
        else:
            logits = model(**inputs, use_cache=False).logits[:, first - 1 :]
        labels = labels[:, first:]
        return logits[:, :-1], labels.repeat(candidates, 1) if candidates > 1 else labels

    def _generation_inputs(self, tokenizer, prompts):
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p) :] = 1
        return {"input_ids": ids, "attention_mask": mask}, width

    def _generation_ids(self, tokenizer):
        return {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


SEQ2SEQ = Seq2SeqFamily()
CAUSAL = CausalFamily()
FAMILIES = {f.name: f for f in (SEQ2SEQ, CAUSAL)}


def _is_causal(config) -> bool:
    """A causal LM by its architectures (a causal-LM class), or without them by its model type: one
    with a causal-LM class and no masked-LM one (BERT has both and is an encoder)."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    architectures = getattr(config, "architectures", None) or []
    if architectures:
        causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        return any(a in causal or a.endswith("ForCausalLM") for a in architectures)
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def family_of(config, *, what: str = "base model") -> Family:
    """The family of a model from its config (a ``PretrainedConfig``), or one clear error."""
    if getattr(config, "is_encoder_decoder", False):
        return SEQ2SEQ
    if _is_causal(config):
        return CAUSAL
    raise LoraHubError(f"{what} is a {getattr(config, 'model_type', 'unknown')} model; LoraHub needs a seq2seq "
                       "(encoder-decoder, such as Flan-T5) or a causal LM (decoder-only, such as Llama)")


def family_of_model(model) -> Family:
    """The family of a loaded model (a PEFT wrapper shows its base model's config); a bare module
    without a config (a test double) counts as seq2seq, the family LoraHub started with."""
    config = getattr(model, "config", None)
    return SEQ2SEQ if config is None else family_of(config)
