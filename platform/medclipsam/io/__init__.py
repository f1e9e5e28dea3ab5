"""Storage and file formats: local and fsspec URIs, images and masks with their geometry, case
listings and cohort manifests, the run manifest and per-case records, fetching remote files into
the cache, the sample data, and where MLflow runs go.

May import: ``medclipsam.errors`` and third-party I/O libraries (fsspec, SimpleITK, pyarrow).
Nothing here knows about models, prompts or Ray.
"""
