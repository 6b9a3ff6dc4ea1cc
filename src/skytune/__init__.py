"""skytune: fine-tune LLMs from a YAML recipe, locally or on rented GPUs through SkyPilot."""

__version__ = "0.1.0"
