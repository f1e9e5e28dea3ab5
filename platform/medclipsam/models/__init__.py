"""Model loaders, addressed by URI: BiomedCLIP and other open_clip models, the SAM backends
(segment-anything ViT-B/L/H, MedSAM, LiteMedSAM) with their preprocessing, checkpoint files.

May import: ``ops`` (transforms), ``io`` (fetching URIs into the cache), ``config``, ``errors``.
Importing this package loads nothing heavy; its modules load torch.
"""
