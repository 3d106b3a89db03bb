"""Training and evaluation speed, side by side with the usual Accelerate loop, on one machine in one run.

``scripts/benchmark.py`` runs :func:`main`. The modules, in the order a run uses them:

* :mod:`~tools.benchmark.args`: the flags;
* :mod:`~tools.benchmark.device`: what the run measures on, and our default path there: what the launcher config
  (``--accelerate_config``: cpu.yaml on a CPU, single_gpu.yaml on a GPU) sets, its ``mixed_precision`` (through
  the CPU's bf16 guard) and its ``dynamo_config``; a compiled default pads to length buckets (``--length_buckets
  auto``);
* :mod:`~tools.benchmark.pool`: the data file is tokenized once with the library's tokenizer code. The measured
  steps all draw from one *pool* of examples: ``warmup_steps + steps`` batches of the library's length-grouped
  sampler over the whole file, picked at evenly spaced quantiles of their token count so that short and long
  batches are both represented. Every training case trains on exactly this pool, so the real (non-pad) tokens are
  the same and only the batching, precision, method and loop differ;
* :mod:`~tools.benchmark.cases`: the reference, our default path, then one change at a time. On a GPU the cases
  also cover compiled vs eager, buckets on/off, LoRA, token budgets (``--token_budgets``) and ZeRO-2;
* :mod:`~tools.benchmark.launch`: each case runs in a fresh process (forked from a server that has only imported
  the libraries), with the ``ACCELERATE_*`` variables that ``accelerate launch`` would export for its config
  (DeepSpeed's too), changed only where the case differs (precision, eager, buckets). A case that fails or runs
  out of time is recorded as failed and the run goes on;
* :mod:`~tools.benchmark.worker`: our cases go through the library: ``load_model``/``apply_lora``/
  ``enable_gradient_checkpointing``, ``build_accelerator`` (precision from ``ACCELERATE_MIXED_PRECISION``, as
  ``accelerate launch`` sets it), ``build_optimizer``, ``build_scheduler``, the ``LengthGroupedBatchSampler``, the
  ``Seq2SeqCollator`` and the real ``train_loop`` (called twice: the warm-up steps, then the measured steps);
  compile time is measured with torch's own compile counters, reported on its own and left out of the step times;
* :mod:`~tools.benchmark.reference`: the usual Accelerate summarization example
  (``run_summarization_no_trainer.py``): ``DataLoader(shuffle=True)`` with ``DataCollatorForSeq2Seq`` (dynamic
  padding), fp32, plain ``torch.optim.AdamW`` (PyTorch's default implementation), linear schedule, no clipping,
  same model, pool, batch size and steps, and all CPU cores (not the 1 thread ``accelerate launch`` gives it by
  default);
* :mod:`~tools.benchmark.eval_speed`: summaries/s of :func:`dialogsum.evaluation.generate_summaries` (batched,
  length-sorted) against one ``generate`` call per dialogue (the lab's way), same model, precision and generation
  settings;
* :mod:`~tools.benchmark.report`: rows, ratios against the reference, headline figures against the targets, and
  the table. Model FLOPs utilisation: useful training FLOPs of the measured steps (:mod:`tools.flops`, real tokens
  only) per second over the best dense-matmul rate measured in the same process, right before and after the timed
  steps, at the case's precision;
* :mod:`~tools.benchmark.run`: the run itself; the JSON is rewritten after every case, so a run stopped part-way
  leaves the cases it finished.
"""

from tools.benchmark.args import BenchmarkArgs, parse_args
from tools.benchmark.cases import plan_cases
from tools.benchmark.run import main, run_benchmark

__all__ = ["BenchmarkArgs", "main", "parse_args", "plan_cases", "run_benchmark"]
