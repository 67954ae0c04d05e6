"""The Ray-free core: LoRA modules, base models, composition, the few-shot objective, the search loop, the
recipe, and LoraHub learning in one process."""
