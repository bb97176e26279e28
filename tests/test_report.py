"""The end-of-run report and the plots: every number against the results.json it reads."""

from __future__ import annotations

import json

import pytest

from haflq_flower.report import (
    STATUS_COMPLETED,
    STATUS_NO_UPDATE,
    adapter_lines,
    client_rows,
    main,
    render_report,
    round_rows,
    run_outcome,
    tier_rows,
    weight_budgets,
)
from haflq_flower.results import plot_results


def _client(part, tier, rank, *, up, payload, budget, peak, weights, bits, blocks, status="ok"):
    return {
        "node": 1000 + part,
        "partition": part,
        "tier": tier,
        "rank": rank,
        "num_examples": 100,
        "bytes_up": up,
        "bytes_down": 5000,
        "peak_mem_bytes": peak,
        "weight_bytes": weights,
        "budget_bytes": budget,
        "payload_bytes": payload,
        "bits": bits,
        "block_bits": blocks,
        "status": status,
    }


LOW_BLOCKS = "4,8,4,4"
HIGH_BLOCKS = "16,16,8,8"


def _round(n, acc, clients, update="applied"):
    return {
        "round": n,
        "accuracy": acc,
        "loss": 1.0 - acc,
        "bytes_up": sum(c["bytes_up"] for c in clients if c["status"] == "ok"),
        "bytes_down": 5000 * len(clients),
        "wall_s": 10.0 * (n + 1),
        "clients": clients,
        **({"update": update} if n else {}),
    }


@pytest.fixture
def results() -> dict:
    """Two rounds, two tiers of two clients; one low client fails in round 2."""
    mib = 2**20

    def low(part, r, status="ok"):
        return _client(
            part,
            "low",
            2,
            up=1000 + 100 * r,
            payload=800 + 100 * r,
            budget=1500,
            peak=900_000_000 + part * 1_000_000 + r,
            weights=int(1.5 * mib),
            bits={"16": 0, "8": 2, "4": 6, "2": 0},
            blocks=LOW_BLOCKS,
            status=status,
        )

    def high(part, r):
        return _client(
            part,
            "high",
            8,
            up=4000 + 10 * r,
            payload=3000,
            budget=5000,
            peak=1_200_000_000 + r,
            weights=3 * mib,
            bits={"16": 10, "8": 22, "4": 0, "2": 0},
            blocks=HIGH_BLOCKS,
        )

    rounds = [
        _round(0, 0.5, []),
        _round(1, 0.6, [low(0, 1), low(1, 1), high(2, 1), high(3, 1)]),
        _round(2, 0.7, [low(0, 2), low(1, 2, status="error"), high(2, 2), high(3, 2)]),
    ]
    return {
        "config": {
            "strategy.name": "haflq",
            "strategy.mode": "freeze",
            "strategy.aggregation": "adaptive",
            "blocks.precision": "auto",
            "model.quantization": "nf4",
            "data.name": "rotten-tomatoes",
            "data.partitioner": "dirichlet",
            "lora.rank": 8,
            "tiers.names": "low,mid,high",
            "tiers.memory-mb": "2,2.5,4",
        },
        "rounds": rounds,
        "final": {
            "status": STATUS_COMPLETED,
            "status_reason": "2 of 2 training round(s) applied an update",
            "accuracy": 0.7,
            "best_accuracy": 0.7,
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds),
            "wall_s": 31.0,
            "adapter_dir": "/runs/x/adapter",
            "base_model": "/cache/smollm2",
            "num_labels": 2,
            "accuracy_by_tier": {"low": 0.65, "high": 0.7},
        },
    }


def test_tier_rows_against_the_client_records(results):
    rows = {r.tier: r for r in tier_rows(results)}
    assert list(rows) == ["low", "high"]  # configured order; "mid" had no client
    low, high = rows["low"], rows["high"]
    assert (low.partitions, high.partitions) == ([0, 1], [2, 3])
    assert (low.lora_rank, high.lora_rank, low.global_rank) == (2, 8, 8)
    assert low.bits_per_block == {8: 1, 4: 3} and high.bits_per_block == {16: 2, 8: 2}
    assert low.weight_bytes == int(1.5 * 2**20) and low.weight_budget_bytes == 2 * 2**20
    assert high.weight_budget_bytes == 4 * 2**20 and low.weights_within_budget
    # peak memory: the largest over the tier's ok replies (the failed one does not count)
    assert low.peak_mem_bytes == 900_000_000 + 1_000_000 + 1
    assert high.peak_mem_bytes == 1_200_000_000 + 2
    # uplink: mean per client and round over ok replies: 1100, 1100, 1200
    assert low.uplink_bytes_per_round == pytest.approx((1100 + 1100 + 1200) / 3)
    assert low.payload_bytes_per_round == pytest.approx((900 + 900 + 1000) / 3)
    assert low.channel_budget_bytes == 1500 and low.payload_within_budget
    assert high.uplink_bytes_per_round == pytest.approx((4010 * 2 + 4020 * 2) / 4)
    # widths summed over the ok replies: 3 low replies, 4 high replies
    assert low.widths == {"16": 0, "8": 6, "4": 18, "2": 0}
    assert high.widths == {"16": 40, "8": 88, "4": 0, "2": 0}
    assert low.replies_ok == 3 and high.replies_ok == 4
    assert (low.accuracy_own_base, high.accuracy_own_base) == (0.65, 0.7)


def test_client_and_round_rows(results):
    clients = client_rows(results)
    assert [c.partition for c in clients] == [0, 1, 2, 3]
    assert clients[1].rounds_ok == 1 and clients[1].uplink_bytes_per_round == 1100
    assert clients[0].uplink_bytes_per_round == pytest.approx(1150)
    assert clients[3].channel_budget_bytes == 5000
    rows = round_rows(results)
    assert [r.round for r in rows] == [0, 1, 2]
    assert [r.bytes_up for r in rows] == [r["bytes_up"] for r in results["rounds"]]
    assert rows[-1].cumulative_up == results["final"]["bytes_up"]
    assert rows[0].update == "initial adapter" and rows[2].update == "applied"


def test_run_outcome_from_the_update_records():
    def r(n, update):
        return {"round": n, "update": update}

    assert run_outcome([{"round": 0}, r(1, "applied"), r(2, "skipped: x")])[0] == (STATUS_COMPLETED)
    status, reason = run_outcome([{"round": 0}, r(1, "skipped: 0 usable replies (1 error)")])
    assert status == STATUS_NO_UPDATE
    assert "0 usable replies" in reason and "initial" in reason
    assert run_outcome([{"round": 0}])[0] == STATUS_NO_UPDATE


def test_weight_budgets_need_one_per_tier():
    assert weight_budgets({"tiers.names": "a,b", "tiers.memory-mb": "1,2"}) == {
        "a": 2**20,
        "b": 2 * 2**20,
    }
    assert weight_budgets({"tiers.names": "a,b", "tiers.memory-mb": ""}) == {}


def test_report_prints_the_numbers_of_results_json(results, tmp_path):
    text = render_report(results, tmp_path)
    assert "**Status: completed**" in text
    assert "Final test accuracy **0.7000**" in text
    # per tier: rank, pattern, weights / budget, peak, uplink, payload / budget, widths
    low = next(line for line in text.splitlines() if line.startswith("| low "))
    assert "| 2 (0, 1) | 2 / 8 | 1 x 8-bit + 3 x 4-bit | 1.5 MiB / 2.0 MiB (within) |" in low
    assert "| 901 MB |" in low and "| 1.13 kB |" in low
    assert "| 933 B / 1.50 kB (within) |" in low and "| 0 / 6 / 18 / 0 | 0.6500 |" in low
    # accuracy per round, with the update outcome
    assert "| 2 | 0.7000 | 0.3000 |" in text and "| applied |" in text
    # the two lines that load the adapter
    for line in adapter_lines("/cache/smollm2", "/runs/x/adapter", 2)[-2:]:
        assert line in text


def test_report_says_when_nothing_was_applied(results, tmp_path):
    for r in results["rounds"][1:]:
        r["update"] = "skipped: 0 usable replies (4 error), fewer than min_replies=1"
    del results["final"]["status"], results["final"]["status_reason"]
    text = render_report(results, tmp_path)
    assert f"**Status: {STATUS_NO_UPDATE}**" in text and "initial one" in text


def test_report_cli_rebuilds_report_md(results, tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main([str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == capsys.readouterr().out


def test_plots_are_written(results, tmp_path):
    paths = plot_results(results, tmp_path)
    assert [p.name for p in paths] == ["accuracy.png", "memory.png", "uplink.png", "bits.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_plots_of_a_fedit_run_without_tiers(tmp_path):
    """FedIT: no tiers, budgets or widths: accuracy, memory and uplink only."""
    client = {"partition": 0, "node": 1, "tier": "", "rank": 0, "bytes_up": 10, "status": "ok"}
    results = {
        "config": {"strategy.name": "fedit", "lora.rank": 8},
        "rounds": [_round(0, 0.5, []), _round(1, 0.6, [client])],
    }
    names = [p.name for p in plot_results(results, tmp_path)]
    assert names == ["accuracy.png", "memory.png", "uplink.png"]
    row = tier_rows(results)[0]
    assert row.tier == "all clients" and row.lora_rank == 8 and row.block_bits == ""
