"""The minillava-versus-transformers benchmark: it runs at the tiny config and reports every figure the issue
asks for (never asserting how fast, only how each figure follows from the times and counts measured), and the
book's performance page shows the table of the saved result."""

import json
import re
from pathlib import Path

import pytest

from minillava.tools import bench, measure

ROOT = Path(__file__).resolve().parent.parent
SAVED = ROOT / "data" / "results" / "bench_cpu_tiny.json"
PAGE = ROOT / "book" / "performance.md"
SPREAD = {"min", "median", "max"}


@pytest.fixture(scope="module")
def result():
    """One quick run: tiny shapes, 1 warm-up + 1 timed repetition, 16 images, 4 new tokens, batch 8; one thread,
    which keeps it quick on a busy machine (nothing here asserts how fast anything is)."""
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


@pytest.mark.slow
def test_reports_every_ratio_with_its_spread(result):
    for name in ["train_stage1_epoch_ratio", "train_stage1_step_ratio", "train_stage2_step_ratio",
                 "chat_ttft_turn5_ratio"]:
        assert set(result[name]) == SPREAD, name
    assert set(result["decode_tokens_per_s_ratio"]) == {"batch_1", "batch_8"}
    for value in result["decode_tokens_per_s_ratio"].values():
        assert set(value) == SPREAD


@pytest.mark.slow
def test_reports_the_setting(result):
    assert result["device_type"] == "cpu" and result["device"]
    assert result["threads"] == 1  # what the fixture set, not the machine's core count
    assert {"python", "torch", "transformers", "minillava"} <= set(result["versions"])
    assert result["config"]["name"] == "tiny" and result["config"]["batch"] == 8
    assert result["repeats"] == {"warmup": 1, "timed": 1}
    assert result["memory_method"] == bench.MEMORY_CPU  # (VmHWM on a CPU; CUDA's allocator counts on a GPU)
    assert result["parity_max_abs_logit_diff"] < 1e-4  # both sides hold the same weights
    assert result["complete"] is True
    # the repetitions asked for were run: one timed run each (min = median = max), and the stage-1 epoch, over
    # 16 images, ran 3 times (1 warm-up, 1 timed, 1 untimed for memory), encoding each image once
    phases = result["phases"]
    for phase in phases.values():
        for side in ("minillava", "transformers"):
            t = phase[side]["time_s"]
            assert t["min"] == t["median"] == t["max"] > 0
    cache = phases["train_stage1_epoch"]["feature_cache"]
    assert cache == {"hits": 3 * 16 - 16, "misses": 16}
    # the model FLOPs of a training step, by the formula the result states: k * N(LM, non-embedding) * tokens +
    # k * N(head) * text tokens + 2 * N(vision) * image tokens; batch 8 x 160 tokens, 64 image tokens each
    # (64 px / patch 8), k = 4 in stage 1 (LM frozen), 6 in stage 2
    n = result["params"]
    assert n["head"] == 1024 * 256  # tiny: vocabulary 1024 x LM width 256, untied
    tokens, image_tokens = 8 * 160, 8 * (64 // 8) ** 2
    for stage, k in ((1, 4), (2, 6)):
        phase = phases[f"train_stage{stage}_step"]
        flops = (k * n["lm_non_embedding"] * tokens + k * n["head"] * (tokens - image_tokens)
                 + 2 * n["vision"] * image_tokens)
        assert phase["model_flops"] == flops, stage
        for side in ("minillava", "transformers"):
            s = phase[side]
            assert s["model_tflop_per_s"]["median"] == pytest.approx(flops / 1e12 / s["time_s"]["median"])


@pytest.mark.slow
def test_every_phase_reports_both_sides(result):
    phases = result["phases"]
    assert set(phases) == {"train_stage1_epoch", "train_stage1_step", "train_stage2_step", "train_stage2_trl",
                           "decode_batch_1", "decode_batch_8", "chat_ttft_turn5"}
    # what each run of a phase processes: 16 images in the epoch; batch 8 x 160 tokens a step; 4 new tokens a
    # prompt in decoding: a throughput is that count over the run's time
    per_run = {"train_stage1_epoch": {"samples": 16}, "train_stage1_step": {"samples": 8, "tokens": 8 * 160},
               "train_stage2_step": {"samples": 8, "tokens": 8 * 160}, "decode_batch_1": {"tokens": 1 * 4},
               "train_stage2_trl": {"samples": 8 * (8 - 1)},  # steps 2..8 of 8 samples
               "decode_batch_8": {"tokens": 8 * 4}}
    weights_mb = 2 * 4 * sum(result["params"].values()) / 2**20  # both sides' float32 weights stay resident
    targets = {"train_stage1_epoch": 0.5, "train_stage1_step": 0.8, "train_stage2_step": 0.8, "train_stage2_trl": 1.2,
               "decode_batch_1": 1.0, "decode_batch_8": 1.0, "chat_ttft_turn5": 0.3}  # the CPU targets
    for name, phase in phases.items():
        assert set(phase["ratio"]) == SPREAD, name
        for side in ("minillava", "transformers"):
            s = phase[side]
            assert set(s["time_s"]) == SPREAD, (name, side)
            for what, count in per_run.get(name, {}).items():
                assert s[f"{what}_per_s"]["median"] == pytest.approx(count / s["time_s"]["median"]), (name, what)
            assert s["memory"]["peak_mb"] >= s["memory"]["growth_mb"] + weights_mb, (name, side)
            assert s["mfu"] is None, (name, side)  # no peak FLOP/s for a CPU
        ml, hf = phase["minillava"]["time_s"]["median"], phase["transformers"]["time_s"]["median"]
        throughput = name.startswith("decode") or name == "train_stage2_trl"  # above 1 is faster; times: below
        assert phase["ratio"]["median"] == pytest.approx(hf / ml if throughput else ml / hf), name
        ratio = phase["ratio"]["median"]
        assert phase["met"] == (ratio >= targets[name] if throughput else ratio <= targets[name]), name
    assert phases["train_stage1_epoch"]["same_batches"]  # same tokens, labels and pixels on both sides
    assert phases["train_stage1_epoch"]["feature_cache"]["misses"] == 16  # each image encoded once
    assert phases["decode_batch_8"]["same_tokens"]  # same weights, greedy: same tokens
    assert phases["chat_ttft_turn5"]["same_prompt_tokens"]
    assert phases["chat_ttft_turn5"]["prefilled_tokens"] < phases["chat_ttft_turn5"]["prompt_tokens"]
    trl = phases["train_stage2_trl"]  # TRL's collator supervises exactly minillava's tokens; both trained
    assert trl["same_supervision"] is True and trl["trl_version"]
    assert all(0 < loss < 20 for loss in trl["final_loss"].values())
    assert all(trl["run_s"][side]["median"] > trl[side]["time_s"]["median"] for side in ("minillava", "transformers"))
    stage2 = phases["train_stage2_step"]
    assert stage2["memory_met"] == (stage2["minillava"]["memory"]["peak_mb"] < 1500)  # under 1.5 GB


def test_targets_are_judged_on_the_median_ratio():
    """The CPU targets are judged on the median ratio, at or past the bound counting as met, on the tiny config
    on a CPU only; MFU is model TFLOP/s over the device's peak."""
    def phase(median, tflop=None, peak_mb=None):
        side = {"memory": {"peak_mb": peak_mb, "growth_mb": 0.0}}
        if tflop:
            side["model_tflop_per_s"] = {"min": tflop / 2, "median": tflop, "max": tflop * 2}
        # the spread straddles the bound: only the median may decide
        return {"ratio": {"min": median / 10, "median": median, "max": median * 10}, "minillava": side,
                "transformers": {"memory": {"peak_mb": None, "growth_mb": None}}}

    def judged(medians, config="tiny", device="cpu", peak=None, peak_mb=None, tflop=None):
        out = {name: phase(m, tflop, peak_mb) for name, m in medians.items()}
        result = {"config": {"name": config}, "device_type": device, "peak_bf16_tflops": peak}
        bench._summarise(result, out)
        return result["phases"]

    # (time ratios: at most the bound; decoding throughput ratios: at least the bound)
    bounds = {"train_stage1_epoch": 0.5, "train_stage1_step": 0.8, "train_stage2_step": 0.8, "train_stage2_trl": 1.2,
              "decode_batch_1": 1.0, "decode_batch_8": 1.0, "chat_ttft_turn5": 0.3}
    higher = {name: b * 1.01 for name, b in bounds.items()}
    lower = {name: b * 0.99 for name, b in bounds.items()}
    exact = dict(bounds)
    want_higher = {name: name.startswith("decode") or name == "train_stage2_trl" for name in bounds}
    assert {n: p["met"] for n, p in judged(higher).items()} == want_higher
    assert {n: p["met"] for n, p in judged(lower).items()} == {n: not v for n, v in want_higher.items()}
    assert all(p["met"] is True for p in judged(exact).values())
    assert judged(higher)["train_stage1_step"]["target"] == "<= 0.8"
    assert judged(higher)["decode_batch_1"]["target"] == ">= 1.0"
    assert all(p["met"] is None for p in judged(lower, config="base").values())
    assert all(p["met"] is None for p in judged(lower, device="cuda").values())
    # stage-2 peak memory under 1500 MB
    assert judged({"train_stage2_step": 0.5}, peak_mb=1499.0)["train_stage2_step"]["memory_met"] is True
    assert judged({"train_stage2_step": 0.5}, peak_mb=1501.0)["train_stage2_step"]["memory_met"] is False
    assert judged({"train_stage2_step": 0.5}, peak_mb=None)["train_stage2_step"]["memory_met"] is False
    mfu = judged({"train_stage2_step": 0.5}, device="cuda", peak=100.0, tflop=20.0)["train_stage2_step"]
    assert mfu["minillava"]["mfu"] == pytest.approx({"min": 0.1, "median": 0.2, "max": 0.4})
    assert mfu["transformers"]["mfu"] is None  # no TFLOP/s measured on that side
    assert judged({"train_stage2_step": 0.5}, tflop=20.0)["train_stage2_step"]["minillava"]["mfu"] is None


def test_peak_memory_sees_what_a_run_allocates():
    """On a CPU the peak is the process's resident high-water mark during the run, reset before it: a run that
    writes 128 MB grows it by about that much, and an idle run after it grows it by nothing."""
    import torch

    if not measure.reset_peak_rss():
        pytest.skip("the peak resident memory cannot be reset here (not Linux)")

    def resident_mb():
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1)) / 1024

    size_mb, cpu = 128, torch.device("cpu")
    before = resident_mb()
    big = measure.peak_memory(lambda: torch.ones(size_mb * 2**20 // 4), cpu)  # every page written, then freed
    idle = measure.peak_memory(lambda: None, cpu)
    assert 0.9 * size_mb <= big["growth_mb"] <= 1.5 * size_mb
    assert big["peak_mb"] >= before + 0.9 * size_mb
    assert idle["growth_mb"] < 0.2 * size_mb  # the last run's peak was forgotten
    assert idle["peak_mb"] < big["peak_mb"] - 0.8 * size_mb


@pytest.mark.slow
def test_markdown_has_a_row_per_figure(result):
    table = bench.markdown(result)
    for label in ["stage-1 epoch", "stage-1 step", "stage-2 step", "stage-2 training vs TRL", "decode, batch 1",
                  "decode, batch 8", "chat TTFT at turn 5", "peak memory", "stage-2 training vs TRL, peak memory"]:
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
    """The GPU run (made on one H100, since CI has no GPU) is shown exactly as its saved JSON prints."""
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_merge_joins_parts_of_one_setting_and_refuses_others(result):
    """`--merge`: a benchmark run in parts (a run cut short, then `--only` the rest) gives one result; parts of
    another setting, or measuring a figure twice, are refused by name."""
    import copy

    def part(names, command):
        r = copy.deepcopy(result)
        r["phases"] = {k: v for k, v in r["phases"].items() if k in names}
        r["command"], r["complete"] = command, False
        return r

    training = ("train_stage1_epoch", "train_stage1_step", "train_stage2_step", "train_stage2_trl")
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


@pytest.mark.slow
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


def test_performance_page_shows_the_saved_trl_table(capsys):
    """The comparison with TRL's SFTTrainer is shown exactly as its saved JSON prints, and the page's prose
    states what that file holds: the ratio, the padding shares and the collation times."""
    saved_trl = SAVED.parent / "bench_cpu_tiny_trl.json"
    page = PAGE.read_text()
    found = re.search(r"<!-- bench:cpu-trl:start -->\n(.*?)\n<!-- bench:cpu-trl:end -->", page, re.S)
    assert found, "book/performance.md lacks the <!-- bench:cpu-trl:start/end --> markers"
    assert bench.main(["--markdown", str(saved_trl)]) == 0
    assert found.group(1).strip() == capsys.readouterr().out.strip()
    phase = json.loads(saved_trl.read_text())["phases"]["train_stage2_trl"]
    assert phase["same_supervision"] is True and phase["packing"] is False
    assert f"{phase['ratio']['median']:.2f} (an Intel CPU)" in page
    assert f"{phase['padding_share']['minillava']:.1%} padding" in page
    assert f"{phase['padding_share']['transformers']:.1%} expected" in page
    collate = phase["collate_s_per_step"]
    assert f"{collate['transformers']:.3f} s per step" in page and f"{collate['minillava']:.3f} s." in page
    packed = json.loads((SAVED.parent / "bench_cpu_tiny_trl_packed.json").read_text())["phases"]["train_stage2_trl"]
    assert packed["packing"] is True
    assert f"a ratio of {packed['ratio']['median']:.2f} against TRL" in page
    ml, trl = phase["minillava"], phase["transformers"]
    step = {side: 16 / phase[side]["samples_per_s"]["median"] for side in ("minillava", "transformers")}
    assert (f"{step['transformers'] - step['minillava']:.2f} s by which the steps differ "
            f"({step['transformers']:.2f} s against {step['minillava']:.2f} s") in page
    assert f"({ml['memory']['peak_mb']:.0f} against {trl['memory']['peak_mb']:.0f} MB" in page
    assert (f"{packed['minillava']['samples_per_s']['median']:.1f} samples/s against "
            f"{ml['samples_per_s']['median']:.1f} padded") in page
