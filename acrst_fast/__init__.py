"""acrst_fast: Adaptive Class-Rebalancing Self-Training for semi-supervised object detection."""
__version__ = "0.1.0"
