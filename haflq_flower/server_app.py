"""ServerApp: run config -> strategy -> federated rounds -> results, plots, PEFT adapter."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from .checkpoint import (
    CheckpointError,
    config_differences,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from .config import ConfigError, RunConfig
from .data import TaskData, load_task
from .logs import setup_logging
from .lora.merge import merge_stacks, save_expanded_adapter
from .lora.state import (
    check_state,
    from_array_record,
    load_trainable_state,
    to_array_record,
    trainable_state,
)
from .model import count_blocks, load_lora_model, select_device
from .predictions import load_or_new as load_or_new_predictions
from .predictions import save as save_predictions
from .quant.blocks import pattern_to_str
from .quant.mixed import block_layout
from .report import STATUS_COMPLETED, write_report
from .results import RunRecorder, plot_results
from .strategy import build_strategy, load_run_config
from .train import evaluate_run_rows

log = logging.getLogger(__name__)


def run_server(grid: Grid, cfg: RunConfig) -> dict:
    """The whole federated run; returns the ``final`` block of results.json."""
    log.info("Run config: %s", cfg.to_dict())
    log.info("Outputs go to %s", cfg.output_dir)
    device = select_device()
    task = _load_task(cfg)
    strategy = build_strategy(cfg)
    model, tokenizer, server_bits = _server_model(cfg, strategy, task, device)
    initial_state, first_round, recorder = _start_or_resume(cfg, strategy, trainable_state(model))
    after_round = RoundEnd(grid, cfg, strategy, model, tokenizer, task, device, recorder)
    result = strategy.start(
        grid=grid,
        initial_arrays=to_array_record(initial_state),
        num_rounds=cfg.num_rounds,
        timeout=cfg.strategy.round_timeout,
        train_config=ConfigRecord(),
        evaluate_fn=after_round,
        first_round=first_round,
        evaluate_initial=cfg.resume is None,
    )
    final_state = from_array_record(result.arrays)
    adapter_dir = _save_adapter(cfg, strategy, model, tokenizer, final_state)
    # what report.md needs to print the two lines that load the adapter
    extra = {"base_model": _base_model_path(model), "num_labels": task.num_labels}
    if cfg.dp.enabled:
        extra["dp"] = _privacy_spent(cfg, strategy)
    if server_bits is not None:
        extra["accuracy_by_tier"] = _accuracy_by_tier(cfg, strategy, final_state, device, task)
    final = recorder.finish(str(adapter_dir), **extra)
    if cfg.plots:
        plot_results(recorder.data, cfg.output_dir)
    report = write_report(recorder.data, cfg.output_dir)
    log.info(
        "Finished: accuracy %.4f after %d rounds in %.1f s. Results: %s (report: %s)",
        final["accuracy"],
        cfg.num_rounds,
        final["wall_s"],
        cfg.output_dir,
        report.name,
    )
    if final["status"] != STATUS_COMPLETED:
        log.error("The run applied no update: %s", final["status_reason"])
    return final


def _load_task(cfg: RunConfig) -> TaskData:
    task = load_task(cfg.data)
    log.info(
        "Data '%s': %d training rows, %d held-out test rows, %d validation rows, %d labels; "
        "the server evaluates on the %s split",
        cfg.data.name,
        len(task.train),
        len(task.test),
        0 if task.validation is None else len(task.validation),
        task.num_labels,
        cfg.train.eval_split,
    )
    return task


def _server_model(cfg: RunConfig, strategy, task: TaskData, device):
    """The server's model with LoRA (for evaluation and for saving the adapter) and, with
    block-wise precision, the block bits it evaluates with: the 16-bit base, the same
    for every arm (each tier's own pattern is evaluated at the end)."""
    server_bits = None
    if cfg.strategy.blocks.enabled:
        server_bits = (16,) * count_blocks(cfg.model, task.num_labels)
    model, tokenizer = load_lora_model(
        cfg.model,
        cfg.lora,
        task.num_labels,
        cfg.seed,
        device,
        server_bits,
        label_names=task.label_names,
    )
    if server_bits is not None:
        strategy.blocks.layout = block_layout(model)
        log.info(
            "Block layout: %d blocks; weights %.1f MiB at 4 bits, %.1f at 8, %.1f at 16",
            len(server_bits),
            *(
                strategy.blocks.layout.weight_bytes((b,) * len(server_bits)) / 2**20
                for b in (4, 8, 16)
            ),
        )
    return model, tokenizer, server_bits


def _start_or_resume(cfg: RunConfig, strategy, initial_state: dict):
    """The global state and round to start from, and the results recorder: fresh, or
    restored from the checkpoint of ``cfg.resume`` (strategy state, privacy spent,
    random generators and results so far)."""
    if cfg.resume is None:
        return initial_state, 1, RunRecorder(cfg.output_dir, cfg.to_dict(), cfg.num_rounds)
    ckpt = _resume(cfg, initial_state)
    strategy.load_state_dict(ckpt.strategy_meta, ckpt.strategy_arrays)
    strategy.restore_privacy(ckpt.results["rounds"])
    restore_rng(ckpt.rng, ckpt.rng["torch"])
    recorder = RunRecorder(
        cfg.output_dir, cfg.to_dict(), cfg.num_rounds, ckpt.results, ckpt.elapsed_s
    )
    return ckpt.global_state, ckpt.round + 1, recorder


class RoundEnd:
    """Flower's ``evaluate_fn``: after every round, evaluate the global adapter (when
    ``eval.every`` says so), record the round in results.json and checkpoint it."""

    def __init__(self, grid, cfg, strategy, model, tokenizer, task, device, recorder) -> None:
        self.grid, self.cfg, self.strategy = grid, cfg, strategy
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.num_labels = task.num_labels
        self.rows = task.split(cfg.train.eval_split)
        self.recorder = recorder
        self.predictions = None
        if cfg.train.eval_predictions:
            self.predictions = load_or_new_predictions(
                cfg.output_dir, self.rows["label"].to_numpy(), cfg.train.eval_split
            )

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        cfg, strategy = self.cfg, self.strategy
        state = from_array_record(arrays)
        loss = accuracy = None
        if cfg.train.evaluates_after(server_round, cfg.num_rounds):
            result = self._evaluate(server_round, arrays, state)
            loss, accuracy = result.loss, result.accuracy
            if self.predictions is not None and result.predictions is not None:
                self.predictions.add(server_round, result.predictions)
                save_predictions(cfg.output_dir, self.predictions)
        stats = strategy.stats.get(server_round)
        self.recorder.record_round(server_round, accuracy, loss, stats.to_dict() if stats else None)
        if cfg.checkpoint:
            save_checkpoint(
                cfg.output_dir,
                server_round,
                cfg.to_dict(),
                state,
                strategy.state_dict(),
                self.recorder.data,
                self.recorder.elapsed_s,
            )
        if accuracy is None:
            return None
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def _evaluate(self, server_round: int, arrays: ArrayRecord, state: dict):
        # methods without one global model evaluate each client's own (FedSA-LoRA)
        result = self.strategy.evaluate_on_clients(
            self.grid,
            server_round,
            arrays,
            self.rows["label"].to_numpy(),
            self.num_labels,
            self.cfg.strategy.round_timeout,
        )
        if result is not None:
            return result
        merge_stacks(self.model, self.strategy.base_merge())
        load_trainable_state(self.model, state)
        return evaluate_run_rows(
            self.cfg,
            self.model,
            self.tokenizer,
            self.rows,
            self.device,
            f"server eval round {server_round}",
        )


def _save_adapter(cfg: RunConfig, strategy, model, tokenizer, final_state: dict):
    """The final adapter with PEFT's ``save_pretrained`` (and the tokenizer)."""
    load_trainable_state(model, final_state)
    adapter_dir = cfg.output_dir / "adapter"
    merge = strategy.base_merge()
    if merge is None:
        model.save_pretrained(adapter_dir)
    else:  # FLoRA: the merged stacks and the last adapter as one rank-expanded adapter
        rank = save_expanded_adapter(model, final_state, merge, adapter_dir)
        log.info("Saved the merged stacks and the adapter as one rank-%d adapter", rank)
    tokenizer.save_pretrained(adapter_dir)
    return adapter_dir


def _privacy_spent(cfg: RunConfig, strategy) -> dict[str, Any]:
    """``final.dp`` of results.json: the mechanism and the epsilon of the whole run."""
    spent = {
        "mode": cfg.dp.mode,
        "clip": cfg.dp.clip,
        "noise_multiplier": cfg.dp.noise_multiplier,
        "delta": cfg.dp.delta,
        "rounds": len(strategy.accountant.rates),
        "epsilon": strategy.accountant.epsilon(),
    }
    log.info(
        "Differential privacy (%s): epsilon %.3f at delta %.1e over %d round(s)",
        cfg.dp.mode,
        spent["epsilon"],
        cfg.dp.delta,
        spent["rounds"],
    )
    return spent


def _base_model_path(model) -> str | None:
    """Where the adapter's base model loads from (PEFT's ``base_model_name_or_path``)."""
    config = getattr(model, "peft_config", {}).get("default")
    return getattr(config, "base_model_name_or_path", None)


def _resume(cfg: RunConfig, model_state: dict):
    """The checkpoint of the run directory ``cfg.resume``, checked against ``cfg`` and
    against the model's adapter state (keys and shapes)."""
    ckpt = load_checkpoint(cfg.resume)
    try:
        check_state(model_state, ckpt.global_state)
    except ValueError as err:
        raise CheckpointError(
            f"the checkpoint in {cfg.resume} does not fit this model and LoRA config: {err}"
        ) from err
    diffs = config_differences(ckpt.config, cfg.to_dict())
    if diffs:
        raise ConfigError(
            f"cannot resume {cfg.resume}: the run config differs from the checkpoint's in "
            f"{'; '.join(diffs)}. Resume with the same settings (only num-server-rounds, "
            "output.plots, strategy.round-timeout, eval.batch-size and model.cache-dir may "
            "change)."
        )
    if ckpt.round > cfg.num_rounds:
        raise ConfigError(
            f"cannot resume {cfg.resume}: its checkpoint is after round {ckpt.round}, beyond "
            f"num-server-rounds={cfg.num_rounds}"
        )
    log.info(
        "Resuming %s after round %d of %d (accuracy so far %s)",
        cfg.resume,
        ckpt.round,
        cfg.num_rounds,
        ckpt.results["rounds"][-1].get("accuracy"),
    )
    return ckpt


def _accuracy_by_tier(cfg: RunConfig, strategy, state, device, task) -> dict[str, float]:
    """Test accuracy of the final adapter on each tier's own quantized base."""
    patterns: dict[tuple[int, ...], list[str]] = {}
    for job in strategy.assignments.values():
        if job.block_bits is not None:
            tiers = patterns.setdefault(job.block_bits, [])
            if job.profile.tier not in tiers:
                tiers.append(job.profile.tier)
    out = {}
    for bits, tiers in patterns.items():
        model, tokenizer = load_lora_model(
            cfg.model, cfg.lora, task.num_labels, cfg.seed, device, bits
        )
        load_trainable_state(model, state)
        accuracy = evaluate_run_rows(
            cfg,
            model,
            tokenizer,
            task.split(cfg.train.eval_split),
            device,
            f"final eval on the {'/'.join(tiers)} base",
        ).accuracy
        for tier in tiers:
            out[tier] = accuracy
        log.info(
            "Final accuracy on the %s base (%s): %.4f",
            "/".join(tiers),
            pattern_to_str(bits),
            accuracy,
        )
        del model
    return out


def make_server_app(overrides: Mapping[str, Any] | None = None) -> ServerApp:
    """A ServerApp; ``overrides`` win over the run config (for in-process simulations)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        setup_logging()
        run_server(grid, load_run_config({**dict(context.run_config), **(overrides or {})}))

    return server_app


app = make_server_app()
