"""The one Ray layer: connecting to Ray, model-holding evaluator actors, the search as Ray Tune trials, Ray Data
evaluation, the Ray Serve application and Ray Jobs. Nothing below this package imports Ray."""
