"""Full fine-tuning of a seq2seq model (default google/flan-t5-base) on dialogue summarization.

Every weight is trained and saved (model.safetensors, ~1 GB for flan-t5-base). Launch with accelerate (the
config chooses CPU, GPU(s), DeepSpeed or FSDP):
  accelerate launch --config_file accelerate_configs/cpu.yaml scripts/train_full.py --quickstart --output_dir qs
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dialogsum.cli import run_cli
from dialogsum.config import parse_config


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, save, evaluate and write the results; returns what metrics.json holds."""
    cfg = parse_config(argv, method="full", description=__doc__ or "")
    # torch and transformers load only now: a bad flag is reported before that, in a fraction of a second
    from dialogsum import checkpointing, data, distributed, modeling, steps, tracking, training

    t = cfg.train
    run = steps.check_run(cfg)  # output folder, resume point, data, model, trackers: before anything slow
    accelerator = distributed.build_accelerator(
        t.gradient_accumulation_steps, run.trackers, run.tensorboard_dir, t.ddp_timeout, run.cpu_threads
    )
    try:
        cfg = steps.with_quickstart_assets(cfg, accelerator)  # --quickstart: the generated tiny model and data
        steps.check_and_seed(cfg, run, accelerator)  # fp16 with T5, a checkpoint of other settings: refused here
        splits = data.load_splits(cfg.data, run.splits)
        tokenizer, model = modeling.load_for_training(cfg.model, accelerator, cfg.gen)  # + generation settings
        params = steps.write_run_settings(accelerator, cfg, model, run.out)  # config.yaml, parameters.json
        result = size_mb = None
        if t.do_train:
            loader, sampler, val_loader = steps.build_dataloaders(cfg, splits, tokenizer, accelerator)
            optimizer = training.build_optimizer(model, cfg)
            distributed.set_deepspeed_micro_batch(accelerator, t.per_device_train_batch_size)
            model, optimizer, loader, val_loader = accelerator.prepare(model, optimizer, loader, val_loader)
            total_steps = training.plan_steps(cfg, sampler, accelerator.num_processes)
            scheduler = training.build_scheduler(optimizer, cfg, total_steps)  # stepped by the loop, not prepared
            state = checkpointing.start_or_resume(accelerator, cfg, scheduler, run.resume)
            run_config = {"parameters": params, "total_optimizer_steps": total_steps}
            tracking.start_tracking(accelerator, cfg, run_config, resumed_at=state.step)  # a restart: the same run
            evaluate = steps.build_validation(accelerator, model, tokenizer, val_loader, splits, cfg)
            result = training.train_loop(
                accelerator, cfg, model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler,
                loader=loader, sampler=sampler, total_steps=total_steps, state=state, evaluate=evaluate,
                resume_from=run.resume,
            )
            checkpointing.load_best_model(accelerator, cfg, result.state)  # --load_best_model_at_end
            size_mb = modeling.save_model(accelerator, model, tokenizer, run.out)  # weights + config + tokenizer
        else:  # --do_train false: evaluate the starting model
            tracking.start_tracking(accelerator, cfg, {"parameters": params})
            model = steps.prepare_for_evaluation(accelerator, model, cfg)
        scores, predictions = steps.evaluate_run(accelerator, model, tokenizer, splits, cfg)
        metrics = steps.run_metrics(accelerator, cfg, params, scores, result, size_mb)
        steps.write_results(accelerator, run.out, cfg, metrics, predictions)  # metrics, predictions, report, card
        steps.publish(accelerator, cfg, run)  # --push_to_hub: model, tokenizer, card, metrics, report
        tracking.finish_tracking(
            accelerator, metrics, predictions, params, run.out, cfg.track.log_model, step=metrics.get("train_steps")
        )
        return metrics
    finally:
        distributed.finish(accelerator)


if __name__ == "__main__":
    run_cli(main)
