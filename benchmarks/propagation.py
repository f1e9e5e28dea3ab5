"""Propagation from one key slice against the slice-wise oracle, on real volumes with labels.

For each volume (the bundled sample volumes: brain MRI, breast, lung CT; with ``--mni``, also
nilearn's MNI152 T1 template and its brain mask, a whole organ over some 80 axial slices):

- ``propagated``: the truth's box on its largest slice only (``oracle.key_slices: 1``), carried
  through the volume by ``segment.propagate`` with the ``propagation:`` defaults (or ``--set
  name=value`` overrides), the 3D clean-up applied;
- ``slicewise``: the truth's box on every labelled slice (the slice-wise oracle, one prompt per
  slice);
- a naive chain as a reference: the previous mask's tight box, no margin, no stop rule but an
  empty mask (``box_margin=0``, every threshold off).

- ``text``: key-slice text prompting (text mode with ``--propagate``) with the sample task's config
  (``configs/brain_tumor_mri.yaml``, ``breast_mri.yaml``, ``lung_nodule_ct.yaml``; the MNI brain
  takes the brain tumour config's settings with a whole-brain sentence): M2IB on the sampled
  slices only (``add_key_slice_prompts``), against slice-wise text mode's M2IB on every slice.
  BiomedCLIP's weights are not on this machine, so by default the CLIP is a BiomedCLIP-shaped model
  with random weights: its M2IB calls are real (the stage decides them, not the model), its maps
  mean nothing, so SAM is not run on them. With ``--clip DIR`` (a BiomedCLIP folder) the chain runs
  too and the volume's line adds ``dsc_text``.

The stages are the pipeline's (``case_slices``, ``add_propagated_masks``, ``add_masks``,
``add_key_slice_prompts``) with the real LiteMedSAM; 3D DSC against the truth; SAM calls are the
slices whose image was embedded, M2IB calls the slices M2IB ran on. One line per volume, then the
means.

Last line: ``dsc_propagated=<v> dsc_oracle_slicewise=<v> dsc_naive=<v> ratio=<v> sam_calls_ratio=<v>
m2ib_calls_ratio=<v>`` (means over the volumes; ``ratio`` = dsc_propagated / dsc_oracle_slicewise;
``sam_calls_ratio`` = SAM calls of propagation / of the slice-wise oracle; ``m2ib_calls_ratio`` =
M2IB calls of key-slice text prompting / of slice-wise text mode (one per slice); both summed over
the volumes).

    python benchmarks/propagation.py [--volumes brain1 lung2 ...] [--mni] [--set min_overlap=0.6 ...]
                                     [--clip DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TASKS = {"brain": "brain_tumor_mri.yaml", "breast": "breast_mri.yaml", "lung": "lung_nodule_ct.yaml",
         "mni": "brain_tumor_mri.yaml"}
WHOLE_BRAIN = "A T1-weighted axial brain MRI slice; the whole brain."


def _mni(folder: Path) -> tuple[str, str]:
    """nilearn's MNI152 T1 template and brain mask (shipped in its wheel) as NRRD files."""
    import SimpleITK as sitk
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    paths = []
    for name, loaded in (("mni_t1", load_mni152_template(resolution=2)), ("mni_brain", load_mni152_brain_mask(2))):
        array = np.asarray(loaded.get_fdata())
        image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)).astype(np.float32 if name == "mni_t1"
                                                                               else np.uint8))
        image.SetSpacing(tuple(float(abs(v)) for v in np.diag(loaded.affine)[:3]))
        path = folder / f"{name}.nrrd"
        sitk.WriteImage(image, str(path))
        paths.append(str(path))
    return paths[0], paths[1]


def _value(text: str):
    return {"true": True, "false": False}.get(text.lower(), None) if text.lower() in ("true", "false") \
        else (float(text) if "." in text else int(text))


def _random_clip():
    """A BiomedCLIP-shaped model with random weights (its M2IB runs for real; its maps mean nothing)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from m2ib import random_clip  # a sibling benchmark script

    return random_clip("vit_tiny_patch16_224", 2, 128, 512, "cpu")


def text_pass(clip, name: str, image: str, truth: np.ndarray, settings, segmenter,
              chain: bool) -> tuple[int, int, float]:
    """Key-slice text prompting on one volume with its task's config: (M2IB calls, slices, and with
    ``chain`` the propagated mask's 3D DSC, else NaN)."""
    import json

    import yaml

    from medclipsam.config import parse_config
    from medclipsam.eval.metrics import dice
    from medclipsam.ops.postprocess import clean_volume
    from medclipsam.pipeline.assembly import case_mask
    from medclipsam.pipeline.slices import SOURCE_TEXT, CaseTask, case_slices
    from medclipsam.pipeline.stages import add_key_slice_prompts, add_propagated_masks

    raw = yaml.safe_load((CONFIGS / TASKS[next(k for k in TASKS if name.startswith(k))]).read_text())
    config = parse_config({**raw, "text": {**raw["text"], "clip_model": clip.uri}})
    sentences = [WHOLE_BRAIN] if name.startswith("mni") else config.text.prompts
    rows = case_slices(CaseTask(name, image, prompt=json.dumps(sentences)), config.image, SOURCE_TEXT)
    rows = add_key_slice_prompts(clip, rows, config.saliency, config.coarse, config.visual_prompts, settings)
    calls = sum(row.m2ib_ran for row in rows)
    if not chain:
        return calls, len(rows), math.nan
    for row in rows:
        row.overlay = True  # keep the images for case_mask's geometry
    rows = add_propagated_masks(segmenter, rows, config.sam, settings)
    if any(r.error for r in rows):
        raise SystemExit(f"{name} (text): {next(r.error for r in rows if r.error)}")
    mask = clean_volume(case_mask(rows) > 0, settings.keep_components, settings.fill_holes)
    return calls, len(rows), dice(mask, truth)


def run(volumes: list[tuple[str, str, str]], overrides: dict, clip, chain_text: bool) -> dict:
    from medclipsam.config import ImageConfig, PropagationConfig, SamConfig
    from medclipsam.domain.images import read_mask
    from medclipsam.eval.metrics import dice
    from medclipsam.models.sam_backends import segmenter_for
    from medclipsam.ops.postprocess import clean_volume
    from medclipsam.pipeline.assembly import case_mask
    from medclipsam.pipeline.slices import SOURCE_LABELS, CaseTask, case_slices
    from medclipsam.pipeline.stages import add_masks, add_propagated_masks

    sam = SamConfig()
    segmenter = segmenter_for(sam)
    settings = PropagationConfig(enabled=True, **overrides)
    naive = PropagationConfig(enabled=True, box_margin=0.0, min_score=0.0, min_overlap=0.0, max_growth=1e9,
                              min_contrast=0.0, keep_components=0, fill_holes=False)
    totals = {"propagated": [], "slicewise": [], "naive": [], "calls_propagated": 0, "calls_slicewise": 0,
              "m2ib_calls": 0, "m2ib_slicewise": 0}
    for name, image, label in volumes:
        task = CaseTask(name, image, label)
        truth = read_mask(label).array > 0
        scores, calls = {}, {}
        for kind, propagation in (("propagated", settings), ("naive", naive), ("slicewise", None)):
            rows = case_slices(task, ImageConfig(), SOURCE_LABELS, key_slices=1 if propagation else 0)
            for row in rows:
                row.overlay = True  # keep the images for case_mask's geometry
            if propagation is None:
                rows = add_masks(segmenter, rows, sam)
                mask = case_mask(rows) > 0
            else:
                rows = add_propagated_masks(segmenter, rows, sam, propagation)
                mask = clean_volume(case_mask(rows) > 0, propagation.keep_components, propagation.fill_holes)
            if any(r.error for r in rows):
                raise SystemExit(f"{name}: {next(r.error for r in rows if r.error)}")
            scores[kind], calls[kind] = dice(mask, truth), sum(r.sam_ran for r in rows)
        m2ib, n_slices, dsc_text = text_pass(clip, name, image, truth, settings, segmenter, chain_text)
        totals["m2ib_calls"] += m2ib
        totals["m2ib_slicewise"] += n_slices
        labelled = int(np.count_nonzero(truth.reshape(truth.shape[0], -1).any(axis=1)))
        print(f"{name}: slices={len(rows)} labelled={labelled} dsc_propagated={scores['propagated']:.4f} "
              f"dsc_slicewise={scores['slicewise']:.4f} dsc_naive={scores['naive']:.4f} "
              f"sam_calls_propagated={calls['propagated']} sam_calls_slicewise={calls['slicewise']} "
              f"m2ib_calls={m2ib}" + ("" if math.isnan(dsc_text) else f" dsc_text={dsc_text:.4f}"), flush=True)
        for kind in ("propagated", "slicewise", "naive"):
            totals[kind].append(scores[kind])
        totals["calls_propagated"] += calls["propagated"]
        totals["calls_slicewise"] += calls["slicewise"]
    means = {k: float(np.mean(totals[k])) for k in ("propagated", "slicewise", "naive")}
    return {"dsc_propagated": means["propagated"], "dsc_oracle_slicewise": means["slicewise"],
            "dsc_naive": means["naive"], "ratio": means["propagated"] / max(means["slicewise"], 1e-9),
            "sam_calls_ratio": totals["calls_propagated"] / max(totals["calls_slicewise"], 1),
            "m2ib_calls_ratio": totals["m2ib_calls"] / max(totals["m2ib_slicewise"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--volumes", nargs="*", default=None, help="sample volumes by name [default: all five]")
    parser.add_argument("--mni", action="store_true", help="also nilearn's MNI152 brain (needs nilearn)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="propagation settings")
    parser.add_argument("--clip", default=None, metavar="DIR",
                        help="a BiomedCLIP folder for the text pass [default: random weights, M2IB calls only]")
    args = parser.parse_args()
    from medclipsam.models.biomedclip import load_clip
    from medclipsam.storage.samples import fetch_samples

    samples = Path(fetch_samples())
    names = args.volumes if args.volumes is not None else sorted(p.stem for p in (samples / "images").glob("*.nrrd"))
    volumes = [(n, str(samples / "images" / f"{n}.nrrd"), str(samples / "labels" / f"{n}.nrrd")) for n in names]
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    with tempfile.TemporaryDirectory() as folder:
        if args.mni:
            volumes.append(("mni_brain", *_mni(Path(folder))))
        clip = load_clip(args.clip) if args.clip else _random_clip()
        figures = run(volumes, overrides, clip, chain_text=args.clip is not None)
    print(" ".join(f"{k}={v:.4f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
