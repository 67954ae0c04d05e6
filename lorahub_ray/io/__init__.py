"""Input and output: where things live (local paths, s3://, Hub ids, caches, atomic outputs), example files,
and the module hub catalogue."""
