"""ml_collections config files: `--config=configs/NAME.py[:preset]`."""
