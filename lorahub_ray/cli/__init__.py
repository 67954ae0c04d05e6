"""The ``lorahub-ray`` command line: a thin layer over :mod:`lorahub_ray.api`, one module per command
group. Importing a module registers its commands on :data:`lorahub_ray.cli.app.app`, in the order
that ``lorahub-ray --help`` lists them."""

from lorahub_ray.cli import search  # noqa: F401  (registers its command)
from lorahub_ray.cli import evaluate  # noqa: F401  (evaluate, compare)
from lorahub_ray.cli import demo  # noqa: F401
from lorahub_ray.cli import serve  # noqa: F401
from lorahub_ray.cli import hub  # noqa: F401  (the hub command group)
from lorahub_ray.cli import train  # noqa: F401
from lorahub_ray.cli import jobs  # noqa: F401  (submit)
from lorahub_ray.cli import bbh  # noqa: F401  (the BBH table)
from lorahub_ray.cli.app import app, reflow_help

reflow_help(app)

__all__ = ["app"]
