"""Train a Diff-Plugin Task-Plugin from the command line (same code as the PlugKitTrainTaskPlugin node).

Run through the pack's ``cli.py`` from the ComfyUI folder (so ``comfy`` imports), e.g.::

    python custom_nodes/ComfyUI-PlugKit/cli.py train-diff-plugin \\
        --checkpoint models/checkpoints/v1-5-pruned-emaonly.safetensors \\
        --clip-vision models/clip_vision/clip_vision_vit_l_14.safetensors \\
        --data /data/rain_pairs --output models/diff_plugin/my_derain.safetensors --steps 5000

``--data`` holds ``input/`` (degraded) and ``target/`` (clean) images paired by file name. Training
resumes from ``--output`` (and its ``.optim.pt``) when they exist, unless ``--no-resume``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a Diff-Plugin Task-Plugin (TPB + SCB) on (degraded, clean) pairs.")
    p.add_argument("--checkpoint", required=True, help="SD 1.x checkpoint (.safetensors/.ckpt)")
    p.add_argument("--clip-vision", required=True, help="CLIP ViT-L/14 vision model file")
    p.add_argument("--data", required=True, help="folder with input/ (degraded) and target/ (clean) images")
    p.add_argument("--output", required=True, help="output plugin .safetensors")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", choices=["input", "noise"], default="input")
    p.add_argument("--no-resume", action="store_true")
    return p.parse_args(argv)


def main(argv=None, *, model=None, clip_vision=None, vae=None) -> int:
    """Command-line entry; ``model``/``clip_vision``/``vae`` may be passed in-process (tests)."""
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if model is None or vae is None:
        import comfy.sd

        model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=False)
    if clip_vision is None:
        import comfy.clip_vision

        clip_vision = comfy.clip_vision.load(args.clip_vision)
        if clip_vision is None:
            raise SystemExit(f"'{args.clip_vision}' is not a CLIP vision model")
    from .train_nodes import train_from_folder

    output = Path(args.output)
    if output.suffix != ".safetensors":
        output = output.with_suffix(".safetensors")

    def on_step(step: int, loss: float) -> None:
        if step % 10 == 0 or step == args.steps:
            log.info("step %d/%d loss %.4f", step, args.steps, loss)

    _, report = train_from_folder(
        model, clip_vision, vae, args.data, output, name=output.stem, resolution=args.resolution, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, save_every=args.save_every, seed=args.seed,
        resume=not args.no_resume, start_from_noise=args.start == "noise", on_step=on_step, node="train_cli")
    log.info("%s", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
