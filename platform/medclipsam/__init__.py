"""medclipsam: text-driven medical image segmentation (MedCLIP-SAMv2) at cohort scale."""

__version__ = "0.1.0"
