"""samtone-ray: dual-encoder retrievers trained with same-tower negatives (SamToNe) on Ray."""

__version__ = "0.2.0"
