"""Fine-tuning throughput: training samples per second with 1 and 2 Ray Train workers, and with the
global-batch gather on and off (2 workers), on the same synthetic pairs and model.

CPU default: a small BiomedCLIP-shaped model (ViT-Ti/16, 2-layer BERT) with random weights.
``--gpu`` uses BiomedCLIP's real shapes (ViT-B/16 + BERT-base) and one GPU per worker.
Last line: ``samples_per_s_1=<v> samples_per_s_2=<v>`` (gather on); the line above it has the rest.
``--single`` fits only the 1-worker model (a smoke run: the last line is ``samples_per_s_1=<v>``).

    python benchmarks/finetune.py [--pairs 96] [--epochs 2] [--batch-size 8] [--gpu] [--single]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from m2ib import random_clip
from synthetic_pairs import make_pairs

from medclipsam.finetune.settings import FinetuneConfig
from medclipsam.finetune.trainer import run_finetune
from medclipsam.models.biomedclip import save_clip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="per worker")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--single", action="store_true", help="only the 1-worker fit (a smoke run)")
    parser.add_argument("--vision", default=None, help="timm ViT [default: vit_tiny_patch16_224, --gpu: vit_base]")
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--text-hidden", type=int, default=None)
    args = parser.parse_args(argv)
    vision = args.vision or ("vit_base_patch16_224" if args.gpu else "vit_tiny_patch16_224")
    layers = args.text_layers or (12 if args.gpu else 2)
    hidden = args.text_hidden or (768 if args.gpu else 128)

    import ray

    # Ray Data decodes images on CPUs that the training workers do not hold: leave room for it.
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1"}})
    work = Path(tempfile.mkdtemp(prefix="medclipsam-bench-"))
    model_dir = save_clip(random_clip(vision, layers, hidden, 512, "cpu"), work / "model")
    pairs = make_pairs(work / "pairs", args.pairs)
    figures = {}
    runs = ((1, True),) if args.single else ((1, True), (2, True), (2, False))
    for workers, gather in runs:
        config = FinetuneConfig.model_validate({
            "model": str(model_dir), "data": {"val_fraction": 0.0},
            "loss": {"gather": gather}, "optim": {"epochs": args.epochs, "batch_size": args.batch_size},
            "registry": {"tracking_uri": f"sqlite:///{work / 'mlflow.db'}"},
        })
        result = run_finetune(config, str(pairs), workers=workers, use_gpu=args.gpu,
                              storage_path=str(work / "runs"), name=f"w{workers}-g{int(gather)}")
        figures[(workers, gather)] = result.metrics["samples_per_s"]  # last epoch, all workers together
    print(f"vision={vision} text={layers}x{hidden} pairs={args.pairs} epochs={args.epochs} "
          f"batch_per_worker={args.batch_size} gpu={args.gpu} "
          f"samples_per_s_2_nogather={figures.get((2, False), float('nan')):.2f}")
    last = f"samples_per_s_1={figures[(1, True)]:.2f}"
    print(last if args.single else f"{last} samples_per_s_2={figures[(2, True)]:.2f}")


if __name__ == "__main__":
    main()
