"""adbench: train and evaluate normalizing-flow anomaly detectors on industrial inspection images."""

__version__ = "0.1.0"
