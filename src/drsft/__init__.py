"""drsft: data rewriting for off-policy supervised fine-tuning, as a DVC pipeline."""

__version__ = "0.1.0"
