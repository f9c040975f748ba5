"""The deterministic simulator: a second driver for the unchanged core machines."""
