"""Ray Data pipelines and Ray Train trainers that compose the stage functions."""
