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


def inspect_command(args: argparse.Namespace) -> int:
    from model_impl.convert.inspection import inspect_checkpoint

    result = inspect_checkpoint(args.src, args.num_heads)
    print("\n".join(result.lines))
    return result.status


def convert_command(args: argparse.Namespace) -> int:
    from model_impl.convert import ConvertError
    from model_impl.convert.convert import convert

    try:
        conversion = convert(args.src, args.dst, args.num_heads, args.context_length, args.dtype, args.force,
                             progress=lambda step: print(f"convert: {step}", file=sys.stderr, flush=True))
    except (ConvertError, FileExistsError) as err:
        print(f"tablefree convert: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(conversion.report()))
    print(f"wrote {args.dst} ({conversion.config.model_type}, {str(conversion.dtype).removeprefix('torch.')})")
    del conversion  # its weights: verify loads SRC and the engine next
    return 0 if args.no_verify else verify_checkpoint(args.dst, args.src, args)


def verify_command(args: argparse.Namespace) -> int:
    return verify_checkpoint(args.dst, args.reference, args)


def verify_checkpoint(dst: str, reference: str, args: argparse.Namespace) -> int:
    from model_impl.convert import ConvertError

    try:
        from vllm_plugin.verify import verify

        return 0 if verify(dst, reference, args.new_tokens, args.atol, args.json) else 1
    except ImportError as err:
        print(f"tablefree verify: vLLM is not installed here ({err}); install the cpu or cuda extra", file=sys.stderr)
    except (ConvertError, OSError, ValueError) as err:
        print(f"tablefree verify: error: {err}", file=sys.stderr)
    return 2


def codes_command(args: argparse.Namespace) -> int:
    from model_impl.code_rows import code_rows, describe

    try:
        code, tokenizer, origin = load_code(args.model)
    except ValueError as err:
        print(f"tablefree codes: error: {err}", file=sys.stderr)
        return 2
    print(f"layout: {describe(code)} ({origin})")
    rows = [["token", "id", "bin_16(id)", "A c xor b", f"x[0:{min(args.values, code.width)}]"]]
    for row in code_rows(tokenizer, code, args.text, args.values):
        rows.append([repr(row.token), str(row.id), row.code, row.recoded, " ".join(f"{v:g}" for v in row.values)])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print("\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows))
    return 0


def load_code(model: str | None):
    """(TokenCode, tokenizer, where they come from) of a checkpoint, or of the default layout."""
    from transformers import AutoConfig, AutoTokenizer

    from model_impl import TableFreeConfig, TokenCode
    from model_impl.tokenizer import build_tokenizer

    if model is None:
        config, tokenizer, origin = TableFreeConfig(), build_tokenizer(), "no --model: the default layout, demo tokenizer"
    else:
        config, tokenizer, origin = AutoConfig.from_pretrained(model), AutoTokenizer.from_pretrained(model), model
    if getattr(config, "input_kind", None) != "codes":
        raise ValueError(f"{model} has no token codes (input_kind {getattr(config, 'input_kind', None)!r})")
    return TokenCode.from_config(config), tokenizer, origin


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


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

    insp = commands.add_parser("inspect", help="what a checkpoint holds (headers only); exit 0 if servable as is")
    insp.add_argument("src", help="checkpoint directory or hub id")
    insp.add_argument("--num-heads", type=int, help="attention heads, when config.json does not say")
    insp.set_defaults(func=inspect_command)

    conv = commands.add_parser("convert", help="recover a foreign checkpoint's layout and write it in this one's")
    conv.add_argument("src", help="checkpoint directory or hub id (its remote code runs: trust_remote_code)")
    conv.add_argument("dst", help="output directory (created; must be empty unless --force)")
    conv.add_argument("--num-heads", type=int, help="attention heads, when config.json does not say")
    conv.add_argument("--context-length", type=int, help="context length, when config.json does not say")
    conv.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the dtype of SRC")
    conv.add_argument("--force", action="store_true", help="replace a non-empty DST")
    conv.add_argument("--no-verify", action="store_true", help="skip the vLLM check against SRC")
    conv.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per verify prompt")
    conv.add_argument("--atol", type=float, help="verify's logprob tolerance (default 1e-3)")
    conv.add_argument("--json", help="also write verify's prompts, tokens and verdict to this file")
    conv.set_defaults(func=convert_command)

    ver = commands.add_parser("verify", help="this project's vLLM engine on DST vs SRC's own code; exit 0 if equal")
    ver.add_argument("dst", help="a checkpoint in this project's layout")
    ver.add_argument("--reference", required=True, help="SRC: the checkpoint with its own remote code")
    ver.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per prompt")
    ver.add_argument("--atol", type=float, help="logprob tolerance (default 1e-3; float32 noise is ~1e-5)")
    ver.add_argument("--json", help="also write the prompts, both sides' tokens and the verdict to this file")
    ver.set_defaults(func=verify_command)

    codes = commands.add_parser("codes", help="each token's id, bin_16(id), A c xor b and first input values")
    codes.add_argument("text")
    codes.add_argument("--model", help="checkpoint directory (default: the default layout and demo tokenizer)")
    codes.add_argument("--values", type=positive_int, default=16, metavar="N",
                       help="how many leading values of each vector to show (default 16)")
    codes.set_defaults(func=codes_command)

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
