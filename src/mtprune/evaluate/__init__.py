"""Evaluation: cost (params, MACs, latency); segmentation and classification metrics."""
