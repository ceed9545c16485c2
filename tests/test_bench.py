"""The minillava-versus-transformers benchmark: it runs at the tiny config and reports every figure the issue
asks for (never asserting a timing), and the book's performance page shows the table of the saved result."""

import json
import re
from pathlib import Path

import pytest

from minillava.tools import bench

ROOT = Path(__file__).resolve().parent.parent
SAVED = ROOT / "data" / "results" / "bench_cpu_tiny.json"
PAGE = ROOT / "book" / "performance.md"
SPREAD = {"min", "median", "max"}


@pytest.fixture(scope="module")
def result():
    """One quick run: tiny shapes, 1 warm-up + 1 timed repetition, 16 images, 4 new tokens, batch 8; one thread,
    which keeps it quick on a busy machine (nothing here looks at the timings)."""
    import contextlib
    import io

    import torch

    out, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(out):
            assert bench.main(["--config", "tiny", "--json", "--warmup", "1", "--repeats", "1", "--images", "16",
                               "--new-tokens", "4", "--batch", "8"]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.getvalue())


def test_reports_every_ratio_with_its_spread(result):
    for name in ["train_stage1_epoch_ratio", "train_stage1_step_ratio", "train_stage2_step_ratio",
                 "chat_ttft_turn5_ratio"]:
        assert set(result[name]) == SPREAD, name
    assert set(result["decode_tokens_per_s_ratio"]) == {"batch_1", "batch_8"}
    for value in result["decode_tokens_per_s_ratio"].values():
        assert set(value) == SPREAD


def test_reports_the_setting(result):
    assert result["device_type"] == "cpu" and result["device"] and result["threads"] >= 1
    assert {"python", "torch", "transformers", "minillava"} <= set(result["versions"])
    assert result["config"]["name"] == "tiny" and result["config"]["batch"] == 8
    assert result["repeats"] == {"warmup": 1, "timed": 1}
    assert "N(LM, non-embedding)" in result["flops_formula"] and result["memory_method"]
    assert result["parity_max_abs_logit_diff"] < 1e-4  # both sides hold the same weights
    assert result["complete"] is True


def test_every_phase_reports_both_sides(result):
    phases = result["phases"]
    assert set(phases) == {"train_stage1_epoch", "train_stage1_step", "train_stage2_step", "decode_batch_1",
                           "decode_batch_8", "chat_ttft_turn5"}
    for name, phase in phases.items():
        assert set(phase["ratio"]) == SPREAD and "target" in phase and isinstance(phase["met"], bool), name
        for side in ("minillava", "transformers"):
            s = phase[side]
            assert set(s["time_s"]) == SPREAD and s["memory"]["peak_mb"] > 0, (name, side)
            assert "mfu" in s, (name, side)  # None without a GPU peak
            if name.startswith("train"):
                assert s["samples_per_s"]["median"] > 0 and s["tokens_per_s"]["median"] > 0
            if name.startswith("decode"):
                assert s["tokens_per_s"]["median"] > 0
    assert phases["train_stage1_epoch"]["same_batches"]  # same tokens, labels and pixels on both sides
    assert phases["train_stage1_epoch"]["feature_cache"]["misses"] == 16  # each image encoded once
    assert phases["decode_batch_8"]["same_tokens"]  # same weights, greedy: same tokens
    assert phases["chat_ttft_turn5"]["same_prompt_tokens"]
    assert phases["chat_ttft_turn5"]["prefilled_tokens"] < phases["chat_ttft_turn5"]["prompt_tokens"]
    assert isinstance(phases["train_stage2_step"]["memory_met"], bool)


def test_markdown_has_a_row_per_figure(result):
    table = bench.markdown(result)
    for label in ["stage-1 epoch", "stage-1 step", "stage-2 step", "decode, batch 1", "decode, batch 8",
                  "chat TTFT at turn 5", "peak memory"]:
        assert f"| {label}" in table


def test_performance_page_shows_the_saved_table(capsys):
    """The page's table is exactly what `minillava bench --markdown` prints from the saved JSON:
    after re-running the benchmark, paste its output between the markers."""
    page = PAGE.read_text()
    found = re.search(r"<!-- bench:cpu:start -->\n(.*?)\n<!-- bench:cpu:end -->", page, re.S)
    assert found, "book/performance.md lacks the <!-- bench:cpu:start/end --> markers"
    assert bench.main(["--markdown", str(SAVED)]) == 0
    assert found.group(1).strip() == capsys.readouterr().out.strip(), (
        f"the table in {PAGE.name} is stale: paste `minillava bench --markdown "
        f"data/results/{SAVED.name}` between the markers")
    saved = json.loads(SAVED.read_text())
    assert saved["config"]["name"] == "tiny" and saved["device_type"] == "cpu"


def test_performance_page_shows_the_saved_gpu_table(capsys):
    """The GPU run (made on a lent H200, since CI has no GPU) is shown exactly as its saved JSON prints."""
    saved_gpu = SAVED.parent / "bench_cuda_base.json"
    found = re.search(r"<!-- bench:gpu:start -->\n(.*?)\n<!-- bench:gpu:end -->", PAGE.read_text(), re.S)
    assert found, "book/performance.md lacks the <!-- bench:gpu:start/end --> markers"
    assert bench.main(["--markdown", str(saved_gpu)]) == 0
    assert found.group(1).strip() == capsys.readouterr().out.strip()
    saved = json.loads(saved_gpu.read_text())
    assert saved["device_type"] == "cuda" and saved["config"]["name"] == "base"
    assert saved["transformers_compiled"] and saved["minillava_compiled"]
    mfu = saved["phases"]["train_stage2_step"]["minillava"]["mfu"]["median"]
    assert f"measured {mfu:.1%}" in found.group(1)


def test_out_keeps_each_phase_as_it_finishes(tmp_path, monkeypatch):
    """`--out` writes the result after every phase, so a run cut short keeps what it measured: here the second
    phase fails, and the file holds the first, marked incomplete."""
    import torch

    real = bench.phase_train_step

    def fail_at_stage2(pair, stage, warmup, repeats):
        if stage == 2:
            raise KeyboardInterrupt("cut short")
        return real(pair, stage, warmup, repeats)

    monkeypatch.setattr(bench, "phase_train_step", fail_at_stage2)
    saved, threads = tmp_path / "bench.json", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(KeyboardInterrupt):
            bench.main(["--config", "tiny", "--only", "train_stage1_step", "train_stage2_step", "--warmup", "0",
                        "--repeats", "1", "--batch", "2", "--images", "4", "--out", str(saved)])
    finally:
        torch.set_num_threads(threads)
    partial = json.loads(saved.read_text())
    assert partial["complete"] is False
    assert set(partial["phases"]) == {"train_stage1_step"} and "train_stage1_step_ratio" in partial
    assert not list(tmp_path.glob("*.tmp*"))  # nothing half-written beside it


def test_merge_joins_parts_of_one_setting_and_refuses_others(result):
    """`--merge`: a benchmark run in parts (a run cut short, then `--only` the rest) gives one result; parts of
    another setting, or measuring a figure twice, are refused by name."""
    import copy

    def part(names, command):
        r = copy.deepcopy(result)
        r["phases"] = {k: v for k, v in r["phases"].items() if k in names}
        r["command"], r["complete"] = command, False
        return r

    training = ("train_stage1_epoch", "train_stage1_step", "train_stage2_step")
    a, b = part(training, "first"), part(("decode_batch_1", "decode_batch_8", "chat_ttft_turn5"), "second")
    a["load_average"], b["load_average"] = {"start": 1.0, "end": 2.0}, {"start": 3.0, "end": 4.0}
    a["minillava_decode_compiled"] = True  # (a part that decoded nothing has no say in it)
    merged = bench.merge([a, b])
    assert merged["load_average"] == {"start": 1.0, "end": 4.0}  # the first part's start, the last one's end
    assert merged["minillava_decode_compiled"] is result["minillava_decode_compiled"] is False  # eager on a CPU
    assert set(merged["phases"]) == set(result["phases"]) and merged["complete"] is True
    assert [r["command"] for r in merged["runs"]] == ["first", "second"]
    for key in ("train_stage2_step_ratio", "decode_tokens_per_s_ratio", "chat_ttft_turn5_ratio"):
        assert merged[key] == result[key]
    assert "2 runs" in bench.markdown(merged)
    assert bench.merge([a])["complete"] is False and "Incomplete" in bench.markdown(bench.merge([a]))
    assert bench.merge([a])["minillava_decode_compiled"] is None
    b["load_average"] = {"start": 3.0}  # a part that never recorded its end
    assert "load average 1.0 at the start;" in bench.markdown(bench.merge([a, b]))
    with pytest.raises(ValueError, match="not a saved"):
        bench.merge([a, {"benchmark": "something else"}])
    with pytest.raises(ValueError, match="train_stage1_step again"):
        bench.merge([a, part(("train_stage1_step",), "again")])
    other = part(("decode_batch_1",), "elsewhere")
    other["device"] = "another machine"
    with pytest.raises(ValueError, match="differs in device"):
        bench.merge([a, other])


def test_a_failed_compiled_decoding_is_reported_and_measured_eagerly(tmp_path, monkeypatch):
    """Where minillava's compiled decoding fails (say a GPU stack without CUDA graphs), the benchmark notes why,
    measures the eager step instead, and its result no longer claims compiled decoding."""
    import torch

    from minillava.model import LlavaModel

    real = LlavaModel.generate

    def no_compile(self, *args, compile=False, **kwargs):
        if compile:
            raise RuntimeError("no compiler here")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlavaModel, "generate", no_compile)
    saved, threads = tmp_path / "decode.json", torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench.main(["--config", "tiny", "--only", "decode", "--compile", "no", "--compile-minillava", "yes",
                           "--warmup", "0", "--repeats", "1", "--new-tokens", "2", "--out", str(saved)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(saved.read_text())
    assert result["phases"]["decode_batch_1"]["compiled"] == {"minillava": False, "transformers": False}
    assert result["minillava_decode_compiled"] is False and "decoding and" not in bench.markdown(result)
    assert any("minillava: compiled decoding" in n and "no compiler here" in n for n in result["notes"])
