"""What the `ood` answer costs: /classify/tensor with ood=true vs ood=false, interleaved, against a running server.

    python -m benchmarks.ood_cost --url http://127.0.0.1:3000 --model cnn --out benchmarks/results

Each round sends the same batch twice, once with each setting, in alternating order; the medians and their
difference are one run's. Also in-process: the score alone (service/ood.py's OodScorer on the card's ood.npz)
beside onnxruntime's model call at the same batch size, interleaved. Writes ood_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from threadpoolctl import threadpool_limits

from service.ood import OodScorer


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def served_ms(client: httpx.Client, url: str, model: str, body: bytes, rounds: int) -> dict[str, float]:
    times = {"true": [], "false": []}
    for i in range(rounds):
        for ood in (("true", "false") if i % 2 == 0 else ("false", "true")):
            start = time.perf_counter()
            answer = client.post(url + "/classify/tensor", params={"model": model, "ood": ood}, content=body)
            times[ood].append((time.perf_counter() - start) * 1000)
            answer.raise_for_status()
    return {f"ood_{key}": float(np.median(value)) for key, value in times.items()}


def in_process_ms(model_dir: Path, pixels: np.ndarray, rounds: int) -> dict[str, float]:
    threadpool_limits(limits=1, user_api="blas")  # as the server does (service/ood.py)
    card = json.loads((model_dir / "card.json").read_text())
    section = card["features"]["ood"]
    with np.load(model_dir / section["file"]) as stored:
        scorer = OodScorer(section["method"], stored["references"].astype(np.float32),
                           tuple(float(v) for v in stored["scales"]), float(section["threshold"]))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    model, score = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        _, embedding = session.run(["probabilities", "embedding"], {"pixels": pixels})
        model.append((time.perf_counter() - start) * 1000)
        start = time.perf_counter()
        scorer.answers(scorer.scores(embedding))
        score.append((time.perf_counter() - start) * 1000)
    return {"model_call": float(np.median(model)), "ood_score": float(np.median(score))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:3000")
    p.add_argument("--model", default="cnn")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = p.parse_args(argv)
    from training.data import load_dataset

    images = load_dataset("fashion-mnist", "test").images.numpy()
    report = {"model": args.model, "rounds": args.rounds, "url": args.url, "batches": {},
              "command": f"python -m benchmarks.ood_cost --url URL --model {args.model} --rounds {args.rounds}"}
    with httpx.Client(timeout=60) as client:
        for batch in (1, 64):
            pixels = np.ascontiguousarray(images[:batch])
            served = served_ms(client, args.url, args.model, npy(pixels), args.rounds)
            local = in_process_ms(Path("models") / args.model, pixels, args.rounds)
            report["batches"][str(batch)] = {
                **{key: round(value, 4) for key, value in {**served, **local}.items()},
                "score_share_of_served": round(local["ood_score"] / served["ood_false"], 4),
                "served_difference_share": round((served["ood_true"] - served["ood_false"]) / served["ood_false"], 4)}
            print(batch, report["batches"][str(batch)], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ood_cost.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# What the OOD answer costs", "",
             f"Measured by `{report['command']}` against a local server (2 shared cores), medians of "
             f"{args.rounds} interleaved rounds per setting, and in-process on one thread in the same run.", "",
             "| batch | served ms, ood=false | served ms, ood=true | difference | model call ms (in-process) | "
             "OOD score ms (in-process) | score / served answer |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for batch, row in report["batches"].items():
        lines.append(f"| {batch} | {row['ood_false']:.3f} | {row['ood_true']:.3f} | "
                     f"{row['served_difference_share']:+.1%} | {row['model_call']:.3f} | {row['ood_score']:.3f} | "
                     f"{row['score_share_of_served']:.1%} |")
    (args.out / "ood_cost.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
