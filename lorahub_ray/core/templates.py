"""Prompt templates: how an input text becomes the prompt a model sees (torch-free, so that modules that
Ray Data's light tasks import can check a template without loading torch).

``plain``: the text as it is, tokenised with the tokenizer's special tokens. ``chat``: the tokenizer's
chat template with the text as the user turn and a generation prompt for the assistant turn; the
rendered prompt holds the template's own special tokens, so it is tokenised without adding more.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorahub_ray.errors import LoraHubError

TEMPLATES = ("plain", "chat")


def check_template(template: str, tokenizer=None) -> str:
    """``template`` if it is known (and, with ``tokenizer``, usable by it); else one clear error."""
    if template not in TEMPLATES:
        raise LoraHubError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}")
    if template == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise LoraHubError("template 'chat': the model's tokenizer has no chat template (use --template plain)")
    return template


def render(tokenizer, texts: Sequence[str], template: str = "plain") -> list[str]:
    """The prompt texts of ``texts`` under ``template``."""
    if check_template(template, tokenizer) == "plain":
        return list(texts)
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
            for t in texts]


def render_chat(tokenizer, messages: Sequence[dict]) -> str:
    """A whole conversation (``[{"role", "content"}, ...]``) rendered with the tokenizer's chat template,
    with the generation prompt of the assistant's next turn. Tokenise it as a rendered ``chat`` prompt:
    ``prompt_ids(tokenizer, [text], "rendered")``."""
    check_template("chat", tokenizer)
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, texts: Sequence[str], template: str = "plain", *, max_length: int = 2048) -> list[list[int]]:
    """Token ids of each prompt: plain text with the tokenizer's special tokens, a rendered chat
    template without extra ones (it holds its own). ``template="rendered"``: ``texts`` are prompts
    already rendered with the chat template (:func:`render_chat`), tokenised as they are."""
    prompts = list(texts) if template == "rendered" else render(tokenizer, texts, template)
    enc = tokenizer(prompts, add_special_tokens=template == "plain", truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]
