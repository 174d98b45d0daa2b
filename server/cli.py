"""`tablefree`: the project's command line.

Subcommands import what they need lazily, so `tablefree make-checkpoint` never loads vLLM.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence


def make_checkpoint_command(args: argparse.Namespace) -> int:
    from model_impl.checkpoint import make_checkpoint, make_config

    try:
        config = make_config(
            args.preset,
            args.variant,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            num_attention_heads=args.num_heads,
            code_expansion=args.code_expansion,
            code_bit_order=args.code_bit_order,
            code_values=args.code_values,
            code_scale=args.code_scale,
        )
        summary = make_checkpoint(
            args.out,
            config,
            seed=args.seed,
            dtype=args.dtype,
            force=args.force,
            max_shard_size=args.max_shard_size,
            progress=args.preset == "card",
        )
    except (ValueError, FileExistsError) as err:
        print(f"tablefree make-checkpoint: error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {summary.path} ({args.preset}, {config.model_type}, {args.dtype}): "
        f"{summary.parameters:,} parameters, {summary.input_embedding_parameters} input-embedding parameters"
    )
    return 0


def generate_command(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_impl.checkpoint import default_checkpoint

    model_dir = args.model or default_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    input_ids = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)
    with torch.no_grad():
        output = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(output[0].tolist()))
    return 0


def serve_main(argv: Sequence[str]) -> int:
    """`tablefree serve`: this server's options, then every engine option of `vllm serve`, with vLLM's parser."""
    from pydantic import ValidationError
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from .engine import add_engine_flags
    from .run import serve
    from .settings import add_server_flags, settings_from

    parser = FlexibleArgumentParser(prog="tablefree serve", description=SERVE_HELP)
    parser.add_argument("model_tag", nargs="?", metavar="MODEL",
                        help="checkpoint directory, as in `vllm serve MODEL` (or --model, or TABLEFREE_MODEL); "
                        "default: the card-shaped demo with random weights")
    add_server_flags(parser)
    add_engine_flags(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_from(args)
    except ValidationError as err:
        print(f"tablefree serve: error: {err}", file=sys.stderr)
        return 2
    code = serve(args, settings)
    # The engine is down and every response sent: skip the interpreter's teardown of torch, OpenMP
    # and zmq, which takes seconds and does nothing more (a supervisor is waiting for the exit).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


SERVE_HELP = "OpenAI-compatible server over vLLM (server options also from TABLEFREE_<OPTION> variables)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tablefree", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    make = commands.add_parser("make-checkpoint", help="write a random-weight checkpoint")
    make.add_argument("out", help="output directory (created; must be empty unless --force)")
    make.add_argument("--preset", required=True, choices=["tiny", "card"])
    make.add_argument("--variant", default="affine", choices=["affine", "binary"], help="A, b recoding or plain bin_16")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    make.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    make.add_argument("--max-shard-size", help='split weights into shards, e.g. "2MB"')
    make.add_argument("--hidden-size", type=int, help="override the preset's width (a multiple of 16)")
    make.add_argument("--num-layers", type=int)
    make.add_argument("--num-heads", type=int)
    make.add_argument("--code-expansion", choices=["tile", "interleave"])
    make.add_argument("--code-bit-order", choices=["msb", "lsb"])
    make.add_argument("--code-values", choices=["binary", "bipolar"])
    make.add_argument("--code-scale", type=float)
    make.set_defaults(func=make_checkpoint_command)

    gen = commands.add_parser("generate", help="greedy continuation with Transformers (the card's example)")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="checkpoint directory (default: the card-shaped demo, built on first use)")
    gen.add_argument("--max-new-tokens", type=int, default=3)
    gen.set_defaults(func=generate_command)

    commands.add_parser("serve", help=SERVE_HELP + "; `tablefree serve --help` lists every option")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:  # its parser is vLLM's, built only when serving
        return serve_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
