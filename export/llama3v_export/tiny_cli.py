"""`llama3v-tiny`: writes a random-weight checkpoint of one of the presets, in either layout (LLaVA: `tiny`;
MiniCPM-Llama3-V 2.5: `minicpmv_tiny`), or one with the real target's dimensions (`real_shapes`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import real_shapes, tiny
from .minicpmv_tiny import MINICPMV_PRESETS, make_minicpmv_checkpoint


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llama3v-tiny", description=tiny.__doc__.splitlines()[0])

    parser.add_argument(
        "--preset", required=True, choices=sorted([*tiny.PRESETS, *MINICPMV_PRESETS, real_shapes.REAL_SHAPES_PRESET])
    )
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--llama3v-names",
        action="store_true",
        help="MiniCPM-V presets: name the weights as the llama3v release does (vison.*, projection.*)",
    )
    parser.add_argument(
        "--decoder-layers",
        type=int,
        default=real_shapes.DEFAULT_DECODER_LAYERS,
        help=f"real-shapes only: Llama-3-8B layers (default {real_shapes.DEFAULT_DECODER_LAYERS}, the real model 32)",
    )
    parser.add_argument(
        "--vision-layers",
        type=int,
        default=real_shapes.DEFAULT_VISION_LAYERS,
        help=f"real-shapes only: SigLIP-so400m layers (default {real_shapes.DEFAULT_VISION_LAYERS}, the real model 27)",
    )
    args = parser.parse_args(argv)
    if args.preset == real_shapes.REAL_SHAPES_PRESET:
        real_shapes.write_real_shapes_checkpoint(args.out, args.decoder_layers, args.vision_layers, args.seed)
        print(
            f"wrote {args.preset} checkpoint ({args.decoder_layers} decoder, {args.vision_layers} vision layers, "
            f"seed {args.seed}) to {args.out}"
        )
        return 0
    if args.preset in MINICPMV_PRESETS:
        make_minicpmv_checkpoint(args.preset, args.out, args.seed, renamed=args.llama3v_names)
    else:
        tiny.make_checkpoint(args.preset, args.out, args.seed)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
