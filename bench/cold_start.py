"""Cold start: seconds from process start to /health 200, our server vs vLLM's, tiny and card shapes.

    python -m bench.cold_start [--size smoke|full]

Checkpoints are built beforehand (not timed). Both servers load the same checkpoint with
the same engine settings; the ratio is ours / vLLM's.
"""

import time

from tqdm import tqdm

from bench.common import parser, report
from bench.run import table_free_checkpoint
from bench.server_vs_vllm import server_commands
from tests.live_server import free_port, live_server


def seconds_to_health(cmd: list[str], port: int) -> float:
    start = time.monotonic()
    with live_server(cmd, port, timeout=900):
        return time.monotonic() - start


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    sizes = ["smoke", "full"] if args.size == "full" else ["smoke"]
    rows = []
    for size in tqdm(sizes, desc="shapes"):
        model = str(table_free_checkpoint(size))
        times = {}
        for name in ("tablefree", "vllm"):
            port = free_port()
            times[name] = seconds_to_health(server_commands(model, port, "bfloat16", 1 << 30)[name], port)
        rows.append({"shape": {"smoke": "tiny", "full": "card"}[size], "tablefree_s": times["tablefree"],
                     "vllm_s": times["vllm"], "ratio": times["tablefree"] / times["vllm"]})
    report("cold_start", args.size, rows, args.out)


if __name__ == "__main__":
    main()
