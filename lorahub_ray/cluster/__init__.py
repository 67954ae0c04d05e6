"""The one Ray layer: connecting to Ray, model-holding evaluator actors, the search (a portfolio of restarts in
lockstep over the actors), Ray Data evaluation, the Ray Serve application and Ray Jobs. Nothing below this
package imports Ray."""
