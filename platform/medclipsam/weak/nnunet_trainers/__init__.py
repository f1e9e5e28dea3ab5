"""nnU-Net trainer subclasses. This folder is nnU-Net's ``nnUNet_extTrainer`` during our runs, so
its trainer lookup (training and prediction) finds them by name; modules here use absolute imports."""
