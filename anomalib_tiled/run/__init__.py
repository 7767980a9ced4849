"""A run on disk: its directory and manifest, its ``config.yaml``, its session and log, its prediction store."""
