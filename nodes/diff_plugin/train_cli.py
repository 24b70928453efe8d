"""The Diff-Plugin commands of the pack's ``cli.py``: ``train-diff-plugin`` (same code as the
PlugKitTrainTaskPlugin node) and ``convert-diff-plugin``. Run them through ``cli.py`` with ComfyUI's
Python, e.g. from the ComfyUI folder::

    python custom_nodes/ComfyUI-PlugKit/cli.py train-diff-plugin \\
        --checkpoint models/checkpoints/v1-5-pruned-emaonly.safetensors \\
        --clip-vision models/clip_vision/clip_vision_vit_l_14.safetensors \\
        --data /data/rain_pairs --output models/diff_plugin/my_derain.safetensors --steps 5000
    python custom_nodes/ComfyUI-PlugKit/cli.py convert-diff-plugin models/diff_plugin/derain

``--data`` holds ``input/`` (degraded) and ``target/`` (clean) images paired by file name. Training
resumes from ``--output`` (and its ``.optim.pt``) when they exist; with ``--no-resume`` an existing
output is an error (never overwritten).

Several GPUs (or CPU processes): start the same command with ``torchrun --nproc_per_node N`` instead of
``python``. Each process then trains on its share of the global batch (``--batch-size`` per process x
``--grad-accum`` x N) with DistributedDataParallel (NCCL on GPUs, gloo on CPU); rank 0 saves. The
process group is set up by torch from torchrun's ``env://`` variables (torch reads them, this module
does not).

Every argument is checked before anything heavy is imported or loaded. A mistake is a ``UsageError``
(cli.py prints its one line and exits 2); the module imports only the standard library at load time.
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

log = logging.getLogger(__name__)

TRAIN = "train-diff-plugin"
CONVERT = "convert-diff-plugin"


class UsageError(Exception):
    """A mistake on the command line, as one line that says what to do."""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one ``UsageError`` line (cli.py exits 2), not usage text plus an exit."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see '{self.prog} --help')")


def _number(kind, low, what: str, strict: bool):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>' if strict else '>='} {low}")
        return value
    return parse


def add_comfyui_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--comfyui", metavar="PATH",
                   help="the ComfyUI folder (default: the current folder, else the ComfyUI holding this pack)")


def train_parser(prog: str = f"cli.py {TRAIN}") -> Parser:
    p = Parser(prog=prog, description="Train a Diff-Plugin Task-Plugin (TPB + SCB) on (degraded, clean) pairs.")
    p.add_argument("--checkpoint", required=True, help="SD 1.x checkpoint (.safetensors/.ckpt)")
    p.add_argument("--clip-vision", required=True, help="CLIP ViT-L/14 vision model file")
    p.add_argument("--data", required=True, help="folder with input/ (degraded) and target/ (clean) images")
    p.add_argument("--output", required=True, help="output plugin .safetensors (its folder must exist)")
    p.add_argument("--resolution", type=_number(int, 64, "a whole number", False), default=512,
                   help="training crop size in pixels, a multiple of 8, at least 64 (default 512)")
    p.add_argument("--steps", type=_number(int, 0, "a whole number", True), default=1000, help="total steps (> 0)")
    p.add_argument("--batch-size", type=_number(int, 0, "a whole number", True), default=1,
                   help="pairs per step and process (official train_batch_size; default 1)")
    p.add_argument("--grad-accum", type=_number(int, 0, "a whole number", True), default=1,
                   help="micro-batches accumulated per step (official gradient_accumulation_steps; default 1)")
    p.add_argument("--learning-rate", type=_number(float, 0.0, "a number", True), default=1e-5,
                   help="base AdamW learning rate (official 1e-5)")
    p.add_argument("--lr-scaling", choices=["official", "none"], default="official",
                   help="official (default, train.py's scale_lr): lr x batch size x grad accum x processes; "
                        "none: the learning rate as given")
    p.add_argument("--augment", action="store_true",
                   help="official --use_data_aug: random crop (p 1/2) and horizontal flip (p 1/2), same for both "
                        "images (default off, as the official default)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="compute dtype of the forward (autocast); the plugin keeps fp32 weights; fp16 uses loss "
                        "scaling (default fp32)")
    p.add_argument("--validate-every", type=_number(int, 0, "a whole number", False), default=0,
                   help="every N steps write <output>.validation/step_N.png (input | plugin output | target, the "
                        "official 20-step inference on the first pair); 0: never. The loss curve is written to "
                        "<output>.loss.png at the end")
    p.add_argument("--save-every", type=_number(int, 0, "a whole number", False), default=250,
                   help="save every N steps (0: only at the end)")
    p.add_argument("--seed", type=_number(int, 0, "a whole number", False), default=0)
    p.add_argument("--start", choices=["input", "noise"], default="input")
    p.add_argument("--no-resume", action="store_true",
                   help="start from scratch; an existing --output is then an error, never overwritten")
    add_comfyui_option(p)
    return p


def convert_parser(prog: str = f"cli.py {CONVERT}") -> Parser:
    p = Parser(prog=prog, description="Convert a released Diff-Plugin folder (scb/ + tpb.pt) to one PlugKit "
                                      ".safetensors plugin.")
    p.add_argument("folder", help="released plugin folder holding scb/ and tpb.pt")
    p.add_argument("output", nargs="?", help="output .safetensors (default: <folder>.safetensors); its folder must exist")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_comfyui_option(p)
    return p


def _output_folder(output: Path, prog: str, option: str) -> None:
    if not output.parent.is_dir():
        raise UsageError(f"{prog}: error: {option}: folder '{output.parent}' does not exist; create it first "
                         "(nothing is created outside what you name)")


def check_train_args(args: argparse.Namespace, prog: str = f"cli.py {TRAIN}", given: tuple[str, ...] = ()) -> Path:
    """Checks that need only the file system; returns the output path. ``given``: options whose model was
    passed in-process (not read from the file)."""
    for option, value in (("--checkpoint", args.checkpoint), ("--clip-vision", args.clip_vision)):
        if option not in given and not Path(value).is_file():
            raise UsageError(f"{prog}: error: {option}: file '{value}' not found")
    if not Path(args.data).is_dir():
        raise UsageError(f"{prog}: error: --data: folder '{args.data}' does not exist")
    if args.resolution % 8:
        raise UsageError(f"{prog}: error: --resolution: {args.resolution} is not a multiple of 8")
    output = Path(args.output)
    if output.suffix != ".safetensors":
        output = output.with_name(output.name + ".safetensors")
    _output_folder(output, prog, "--output")
    from . import plugin_training as pt  # torch, but no checkpoint yet

    try:
        pt.check_output(output, not args.no_resume, f"{prog}: error", name_input="--output", resume_fix="drop --no-resume")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    try:
        pairs, _ = pt.find_pairs(args.data)
    except ValueError as exc:
        raise UsageError(f"{prog}: error: --data: {exc}") from None
    if not pairs:
        raise UsageError(f"{prog}: error: --data: no (degraded, clean) pair with the same file name in '{args.data}'")
    return output


def check_convert_args(args: argparse.Namespace, prog: str = f"cli.py {CONVERT}") -> Path:
    folder = Path(args.folder)
    if not ((folder / "tpb.pt").is_file() and (folder / "scb" / "config.json").is_file()):
        raise UsageError(f"{prog}: error: '{folder}' is not a released Diff-Plugin folder (it needs scb/config.json "
                         "and tpb.pt)")
    output = Path(args.output) if args.output else folder.with_name(folder.name + ".safetensors")
    if output.suffix != ".safetensors":
        raise UsageError(f"{prog}: error: output '{output}' must end in .safetensors")
    _output_folder(output, prog, "output")
    if output.exists() and not args.overwrite:
        raise UsageError(f"{prog}: error: output '{output}' already exists; pass --overwrite to replace it or "
                         "name another file")
    return output


def _logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def run_train(args: argparse.Namespace, output: Path, *, model=None, clip_vision=None, vae=None) -> int:
    _logging()
    started = init_distributed()
    try:
        return _run_train(args, output, model=model, clip_vision=clip_vision, vae=vae)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_train(args: argparse.Namespace, output: Path, *, model=None, clip_vision=None, vae=None) -> int:
    if model is None or vae is None:
        import comfy.sd

        try:
            model, _, vae, _ = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=True, output_clip=False)
        except Exception as exc:  # ComfyUI's loader raises many types for a file that is no checkpoint
            raise ValueError(f"--checkpoint: cannot load '{args.checkpoint}' ({type(exc).__name__}: {exc}); "
                             "name an SD 1.x checkpoint") from exc
        if model is None or vae is None:
            raise ValueError(f"--checkpoint: '{args.checkpoint}' holds no SD 1.x model and VAE")
    if clip_vision is None:
        import comfy.clip_vision

        try:
            clip_vision = comfy.clip_vision.load(args.clip_vision)
        except Exception as exc:
            raise ValueError(f"--clip-vision: cannot load '{args.clip_vision}' ({type(exc).__name__}: {exc})") from exc
        if clip_vision is None:
            raise ValueError(f"--clip-vision: '{args.clip_vision}' is not a CLIP vision model")
    from . import plugin_training as pt
    from .runs import train_from_folder

    rank, _ = pt.distributed_world()

    def on_step(step: int, loss: float) -> None:
        if rank == 0 and (step % 10 == 0 or step == args.steps):
            log.info("step %d/%d loss %.4f", step, args.steps, loss)

    stem = output.with_suffix("")

    def on_validation(step: int, image) -> None:
        folder = stem.with_name(stem.name + ".validation")
        folder.mkdir(exist_ok=True)
        path = _save_png(image, folder / f"step_{step:06d}.png")
        log.info("validation image: %s", path)

    result, report = train_from_folder(
        model, clip_vision, vae, args.data, output, name=output.stem, resolution=args.resolution, steps=args.steps,
        batch_size=args.batch_size, learning_rate=args.learning_rate, save_every=args.save_every, seed=args.seed,
        resume=not args.no_resume, start_from_noise=args.start == "noise", grad_accum=args.grad_accum,
        lr_scaling=args.lr_scaling, augment=args.augment, precision=args.precision,
        validate_every=args.validate_every, on_step=on_step, on_validation=on_validation, node="train-diff-plugin")
    if rank == 0:
        if result.losses:
            _save_png(pt.loss_curve_image(result.losses, start_step=result.start_step),
                      stem.with_name(stem.name + ".loss.png"))
        log.info("%s", report)
    return 0


def _save_png(image, path: Path) -> Path:
    """[1, H, W, 3] in [0, 1] -> PNG, written atomically."""
    import os
    import tempfile

    import numpy as np
    from PIL import Image

    arr = (image[0].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def init_distributed() -> bool:
    """Under torchrun (``torch.distributed.is_torchelastic_launched()``): join the process group by torch's
    ``env://`` rendezvous, NCCL when CUDA is there, else gloo, and pick this process's GPU (its node-local
    rank) before ComfyUI chooses a device. Returns whether a group was started here."""
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_torchelastic_launched() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo", init_method="env://")
    if cuda:
        torch.cuda.set_device(dist.get_node_local_rank(fallback_rank=dist.get_rank() % torch.cuda.device_count()))
    return True


def run_convert(args: argparse.Namespace, output: Path) -> int:
    from . import plugin_files

    _logging()
    out = plugin_files.convert_released_plugin(args.folder, output)
    log.info("wrote %s", out)
    return 0


COMMANDS = {TRAIN: (train_parser, check_train_args, run_train),
            CONVERT: (convert_parser, check_convert_args, run_convert)}


def parse(command: str, argv: list[str]) -> tuple[argparse.Namespace, Path]:
    """Parse and check one command's arguments (UsageError on a mistake); nothing heavy is loaded."""
    make_parser, check, _ = COMMANDS[command]
    args = make_parser().parse_args(argv)
    return args, check(args)


def run(command: str, args: argparse.Namespace, output: Path) -> int:
    return COMMANDS[command][2](args, output)


def main(argv=None, *, model=None, clip_vision=None, vae=None) -> int:
    """``train-diff-plugin`` in-process; ``model``/``clip_vision``/``vae`` may be passed in (tests)."""
    args = train_parser().parse_args(list(argv or []))
    given = (("--checkpoint",) if model is not None and vae is not None else ()) + (("--clip-vision",) if clip_vision is not None else ())
    output = check_train_args(args, given=given)
    return run_train(args, output, model=model, clip_vision=clip_vision, vae=vae)

