"""Evaluation without Ray: batched greedy generation and exact match, the fixed batching plan over test sets,
metrics and predictions, and the zero-shot / in-context / LoraHub comparison."""
