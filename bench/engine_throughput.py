"""Engine throughput: our plugin vs vLLM in-tree models of the same shape, and vs Transformers.

    python -m bench.engine_throughput [--size smoke|full] [--dtypes float32,bfloat16] [--single-prompts 2]

Same prompts (32 x 32 random tokens), 128 new tokens each, temperature 0, EOS ignored.
The in-tree references are GPT-2 and GPT-J (rotary, like ours) with our width, depth, heads
and vocab. Targets: plugin/in-tree >= 0.97; plugin/Transformers >= 9 one request at a time, >= 4 as one batch.
One-at-a-time Transformers is slow (~1.6 tok/s at card size), so that pair runs on the first
`--single-prompts` prompts; the ratio compares rates.
"""

from tqdm import tqdm

from bench.common import parser, report
from bench.run import in_tree_checkpoint, random_prompts, table_free_checkpoint, worker

SIZES = {"full": (32, 32, 128), "smoke": (2, 4, 4)}  # prompts, prompt length, new tokens


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--single-prompts", type=int, default=2)
    args = p.parse_args()
    count, length, new = SIZES[args.size]
    prompts = random_prompts(count, length)
    single = prompts[: args.single_prompts]
    models = {"plugin": table_free_checkpoint(args.size), "transformers": table_free_checkpoint(args.size)}
    models |= {kind: in_tree_checkpoint(kind, args.size) for kind in ("gpt2", "gptj")}
    rows = []
    runs = [(dtype, name) for dtype in args.dtypes.split(",") for name in
            ("plugin batch", "gpt2 batch", "gptj batch", "transformers batch", "plugin single",
             "transformers single")]
    results = {}
    for dtype, name in tqdm(runs, desc="engine runs"):
        system, mode = name.split()
        request = {"model": str(models[system]), "dtype": dtype, "max_tokens": new,
                   "prompts": prompts if mode == "batch" else single, "mode": mode}
        results[dtype, name] = r = worker("transformers" if system == "transformers" else "vllm", request)
        r["tok_per_s"] = r["tokens"] / r["seconds"]
    for dtype in args.dtypes.split(","):
        rate = {name: results[dtype, name]["tok_per_s"] for d, name in results if d == dtype}
        for label, a, b, target in [
            ("plugin vs in-tree GPT-2 (batch)", "plugin batch", "gpt2 batch", 0.97),
            ("plugin vs in-tree GPT-J (batch)", "plugin batch", "gptj batch", 0.97),
            ("plugin vs Transformers (one at a time)", "plugin single", "transformers single", 9.0),
            ("plugin vs Transformers (static batch)", "plugin batch", "transformers batch", 4.0),
        ]:
            rows.append({"dtype": dtype, "comparison": label, "ours_tok_s": rate[a], "other_tok_s": rate[b],
                         "ratio": rate[a] / rate[b], "target": f">= {target}", "met": rate[a] / rate[b] >= target})
    report("engine_throughput", args.size, rows, args.out,
           {"prompts": count, "prompt_len": length, "new_tokens": new, "single_prompts": len(single)})


if __name__ == "__main__":
    main()
