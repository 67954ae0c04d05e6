from lorahub_ray.cli import app

app()
