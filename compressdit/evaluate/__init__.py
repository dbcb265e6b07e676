"""Quality metrics, feature extractors and report rendering for compressed models."""
