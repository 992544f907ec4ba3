"""Freeze an interim ``sia-train-diffusion`` checkpoint (its EMA weights) into a model folder.

Only for benchmarks that need an SDAS model before the bundled demo model is finished:
the folder is written by ``sia_pipeline.model.save_model`` exactly like the trainer's final
one, and its card records the checkpoint step, so ``sia-gen --model FOLDER`` says which
model made the data.

    .venv/bin/python bench/sdas_snapshot.py runs/demo_model/checkpoints/checkpoint-1500.pt OUT
"""

from __future__ import annotations

import argparse
import logging

import torch
from diffusers.training_utils import EMAModel

from sia_pipeline.model import PRESETS, build_scheduler, build_unet, save_model


def snapshot(checkpoint: str, out: str) -> str:
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    cfg = state["config"]
    unet = build_unet(
        PRESETS[cfg["preset"]], len(cfg["categories"]), cfg["resolution"], cfg["learn_sigma"]
    )
    unet.load_state_dict(state["unet"])
    ema = EMAModel(unet.parameters(), decay=cfg["ema_decay"])
    ema.load_state_dict(state["ema"])
    ema.copy_to(unet.parameters())
    unet.eval()
    card = {
        "categories": {c: i for i, c in enumerate(cfg["categories"])},
        "resolution": cfg["resolution"],
        "preset": cfg["preset"],
        "train_steps": int(state["step"]),
        "planned_train_steps": cfg["steps"],
        "interim_checkpoint": str(checkpoint),
        "data": cfg["data"],
        "data_fingerprint": state["data_fingerprint"],
        "prediction_type": "epsilon",
        "variance_type": "learned_range" if cfg["learn_sigma"] else "fixed_small",
    }
    return save_model(out, unet, build_scheduler(cfg["learn_sigma"]), card)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("out")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(snapshot(args.checkpoint, args.out))


if __name__ == "__main__":
    main()
