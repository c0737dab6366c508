"""rayreward: tune text-to-image diffusion LoRAs on differentiable rewards (DRTune and its baselines) on Ray."""

__version__ = "0.1.0"
