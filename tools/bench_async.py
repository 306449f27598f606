"""Benchmark: the CPU demo's RL step with rollout generated ahead (rollout.max_staleness = 1)
against the strictly alternating loop (k = 0), side by side in one run.

One SGLang server (``megatron-sapo serve``) is pinned to one core and a one-rank trainer (TP1)
to another with ``taskset``, so generation and training each have a core of their own, as the
30B-A3B job's rollout and training nodes have their own GPUs. The trainer runs in disaggregated
mode against that server, weights synced by ``--weight-sync`` (the 30B-A3B job's "distributed"
by default); before each run the server is given the start model back
(``/update_weights_from_disk``), so every run starts from the same weights.

First the demo's cold start runs once (``--steps 1``) to make the start model; then the runs
alternate k = 0, k = 1 (``--rounds`` times), ``--steps`` steps each, with evaluation off. A
step's time excludes the first step (nothing generated ahead yet) and the last (its checkpoint).
Reported per setting: median step time, median time the trainer waited for rollout, median
generation time of a step's groups, and the fraction of generation hidden behind training
(``rollout_hidden_frac``); then the ratio of step times, k = 1 over k = 0. A figure shows the
timeline of one step of each setting (``--out``/timeline.png): the trainer's stages in turn and
when the servers generated the groups that step trained.

    .venv/bin/python tools/bench_async.py                 # about 6 minutes on 2 cores
    .venv/bin/python tools/bench_async.py --steps 12 --rounds 2

The last line printed is one JSON object with the table's numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import requests

from megatron_sapo.config import WEIGHT_SYNC_METHODS

REPO = Path(__file__).resolve().parents[1]
STAGES = ("rollout", "reward", "old_logprobs", "train", "weight_sync")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="RL steps per run")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each setting, alternating")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_async"), help="work and output folder")
    parser.add_argument("--server-cpu", default="0", help="taskset CPU list of the SGLang server")
    parser.add_argument("--trainer-cpu", default="1", help="taskset CPU list of the trainer")
    parser.add_argument("--weight-sync", default="distributed", choices=WEIGHT_SYNC_METHODS,
                        help="rollout.weight_sync of both settings (the 30B-A3B job's is distributed; on CPU "
                             "tensor sends pickled bytes over HTTP, docs/benchmarks.md)")
    return parser.parse_args(argv)


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_sapo.cli", *args]


def write_config(path: Path, start_model: Path | None, server: str | None, staleness: int, steps: int,
                 weight_sync: str = "tensor") -> Path:
    from megatron_sapo.config_file import config_from_dict, dump_config

    raw = tomllib.loads((REPO / "examples/tiny_cpu/sapo.toml").read_text())
    raw["parallel"]["tp"] = 1
    raw["train"].update(steps=steps, out_dir=str(path.parent / path.stem))
    raw["eval"]["every"] = 0
    raw["logging"]["histogram_every"] = 0
    raw["rollout"].update(max_staleness=staleness, weight_sync=weight_sync)
    if start_model is not None:
        raw["model"] = {"hf_dir": str(start_model), "params_dtype": "fp32"}
        raw["train"]["sft_steps"] = 0
    if server is not None:
        raw["rollout"].update(mode="disaggregated", servers=[server])
        raw["rollout"].pop("num_servers"), raw["rollout"].pop("server_tp")
    path.write_text(dump_config(config_from_dict(raw, source=str(path))))
    return path


def run(cmd: list[str], cpu: str, log: Path) -> None:
    with open(log, "w") as out:
        done = subprocess.run(["taskset", "-c", cpu, *cmd], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")


def start_server(model: Path, port: int, cpu: str, log: Path) -> subprocess.Popen:
    out = open(log, "w")
    proc = subprocess.Popen(["taskset", "-c", cpu, *cli("serve", "--model", str(model), "--port", str(port),
                                                         "--dtype", "float32")],
                            stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the server exited ({proc.returncode}); see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except requests.ConnectionError:
            pass
        time.sleep(1)
    proc.kill()
    sys.exit(f"the server did not become healthy in 600 s; see {log}")


def serve_start_model(port: int, model: Path) -> None:
    url = f"http://127.0.0.1:{port}"
    for path, body in (("/begin_weight_update", {}),
                       ("/update_weights_from_disk", {"model_path": str(model), "weight_version": "step-0"}),
                       ("/end_weight_update", {})):
        response = requests.post(url + path, json=body, timeout=600)
        if response.status_code != 200:
            sys.exit(f"{url}{path}: HTTP {response.status_code}: {response.text[:300]}")


def summarise(rows: list[dict]) -> dict:
    steps = rows[1:-1]  # the first generates nothing ahead; the last saves a checkpoint
    med = lambda key: statistics.median(r[key] for r in steps)  # noqa: E731
    return {"step_s": med("time_step_s"), "rollout_wait_s": med("time_rollout_s"),
            "generation_s": med("time_generation_s"), "train_s": med("time_train_s"),
            "hidden_frac": med("rollout_hidden_frac"), "steps_timed": len(steps)}


def timeline_figure(examples: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 1, figsize=(9, 1.8 * len(examples) + 0.6), squeeze=False)
    colours = dict(zip(STAGES, ("#c44e52", "#8172b2", "#ccb974", "#4c72b0", "#55a868")))
    for ax, (k, row) in zip(axes[:, 0], sorted(examples.items())):
        start = 0.0
        for stage in STAGES:
            width = row.get(f"time_{stage}_s", 0.0)
            ax.barh(1, width, left=start, color=colours[stage], label=stage.replace("_", " "))
            start += width
        ax.barh(0, row["time_generation_s"], left=row["time_generation_start_s"], color="#dd8452",
                label="generating this step's groups")
        ax.axvline(0, color="k", lw=0.6)
        ax.set_yticks([0, 1], ["servers", "trainer"])
        ax.set_title(f"max_staleness = {k}: step {row['step']} ({row['time_step_s']:.2f} s)", fontsize=9)
        ax.set_xlabel("seconds from the step's start")
    axes[0, 0].legend(fontsize=7, ncol=3, loc="upper left", bbox_to_anchor=(0, -0.45))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    from megatron_sapo.parallel.ports import free_port

    print("cold start (the demo's supervised steps, once) ...", flush=True)
    prep = write_config(out / "prep.toml", None, None, 0, 1)
    run(cli("train", str(prep), "--output", str(out / "prep")), args.trainer_cpu, out / "prep.log")
    start_model = out / "prep" / "start_model"

    port = free_port()
    server = start_server(start_model, port, args.server_cpu, out / "server.log")
    results: dict[int, list[dict]] = {0: [], 1: []}
    examples: dict[int, dict] = {}
    try:
        for round_ in range(args.rounds):
            for k in (0, 1):
                name = f"k{k}_round{round_}"
                print(f"{name}: {args.steps} steps ...", flush=True)
                serve_start_model(port, start_model)
                config = write_config(out / f"{name}.toml", start_model, f"127.0.0.1:{port}", k, args.steps,
                                      args.weight_sync)
                run(cli("train", str(config), "--output", str(out / name)), args.trainer_cpu, out / f"{name}.log")
                rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
                results[k].append(summarise(rows))
                examples[k] = rows[len(rows) // 2]
    finally:
        server.terminate()
        server.wait(timeout=60)

    table = {k: {key: statistics.mean(r[key] for r in runs) for key in runs[0]} for k, runs in results.items()}
    ratio = table[1]["step_s"] / table[0]["step_s"]
    print("\n| max_staleness | step s | trainer waits for rollout s | generation s | train s | generation hidden |")
    print("|---|---|---|---|---|---|")
    for k, row in table.items():
        print(f"| {k} | {row['step_s']:.3f} | {row['rollout_wait_s']:.3f} | {row['generation_s']:.3f} | "
              f"{row['train_s']:.3f} | {row['hidden_frac']:.2f} |")
    print(f"\nstep time, k = 1 / k = 0: {ratio:.3f}")
    timeline_figure(examples, out / "timeline.png")
    print(f"timeline: {out / 'timeline.png'}")
    print(json.dumps({"k0": table[0], "k1": table[1], "step_time_ratio": ratio, "steps": args.steps,
                      "rounds": args.rounds, "server_cpu": args.server_cpu, "trainer_cpu": args.trainer_cpu,
                      "weight_sync": args.weight_sync}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
