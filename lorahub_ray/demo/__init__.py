"""The embedded default: a small LoraHub world built locally on first use, and the demo that runs on it."""
