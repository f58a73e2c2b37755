"""The benchmark's orchestration of tune variants (kernels/bench.py), with stand-ins for the timed op and the clock.

The timings themselves need a GPU (CUDA events); what is checked here is which variant is timed when, under which
settings and warm-up, and which samples make up each row.
"""

from __future__ import annotations

import pytest
import torch

from linearize.kernels import bench


@pytest.fixture
def stand_ins(monkeypatch):
    """TUNE of three variants; ``with_settings`` records the variant it runs under, ``cuda_samples`` logs every call
    and returns 100 ms in round 0 (compile and warm-up: must not reach a row) and the variant's own time after."""
    variants = {"a": {}, "b": {"X": 1}, "c": {"Y": 2}}
    own = {"a": 1.0, "b": 2.0, "c": 3.0}
    log, current = [], {}
    fwd, step = object(), object()

    def with_settings(overrides, fn):
        current["name"] = next(n for n, o in variants.items() if o is overrides)
        return fn()

    def cuda_samples(fn, reps, **warm):
        name = current["name"]
        if name in state["fail"]:
            raise RuntimeError(f"variant {name} broke")
        log.append((name, "fwd" if fn is fwd else "fwd_bwd", reps, warm))
        t = 100.0 if warm == {} else own[name] + (0.5 if fn is step else 0.0)
        return [t] * reps, [0.1] * reps

    state = {"fail": set()}
    monkeypatch.setattr(bench, "TUNE", variants)
    monkeypatch.setattr(bench, "ours", lambda T: (fwd, step))
    monkeypatch.setattr(bench, "with_settings", with_settings)
    monkeypatch.setattr(bench, "cuda_samples", cuda_samples)
    monkeypatch.setattr(bench, "peak_gib", lambda fn: 0.25)
    return log, state


def test_tune_rounds_interleave_the_variants_and_keep_only_the_timed_rounds(stand_ins):
    log, _ = stand_ins
    rows = bench.tune([64], reps=5, rounds=3)
    order = [name for name, kind, *_ in log if kind == "fwd"]
    # round 0 (warm-up) a b c, then the order reversed every other round
    assert order == list("abc") + list("cba") + list("abc") + list("cba")
    assert all(warm == {} for _, _, _, warm in log[:6])  # round 0: the full warm-up, with compiles
    assert all(warm == {"warmup": 1, "warmup_ms": 0.0} for _, _, _, warm in log[6:])
    assert {reps for _, _, reps, _ in log} == {2}  # ceil(5 / 3) calls a round
    assert [r["variant"] for r in rows] == list("abc")
    for row, t in zip(rows, (1.0, 2.0, 3.0)):
        assert row["fwd_ms"] == t and row["fwd_bwd_ms"] == t + 0.5, "a warm-up sample reached the median"
        assert row["fwd_calls"] == row["fwd_bwd_calls"] == 6, "the medians are not over the timed rounds alone"
        assert row["rounds"] == 3 and row["peak_gib"] == 0.25 and row["T"] == 64


def test_tune_rounds_report_a_failing_variant_and_time_the_others(stand_ins):
    log, state = stand_ins
    state["fail"].add("b")
    rows = bench.tune([64], reps=4, rounds=2)
    assert "b" not in {name for name, *_ in log}
    by = {r["variant"]: r for r in rows}
    assert by["b"]["skipped"] == "RuntimeError: variant b broke" and "fwd_ms" not in by["b"]
    assert by["a"]["fwd_ms"] == 1.0 and by["c"]["fwd_bwd_ms"] == 3.5


def test_tune_without_rounds_times_each_variant_once_in_turn(stand_ins, monkeypatch):
    measured = []
    monkeypatch.setattr(bench, "measure", lambda op, build, T, reps: measured.append(T) or {"op": op, "T": T})
    rows = bench.tune([64, 128], reps=3, variants=["c", "a"])
    assert measured == [64, 64, 128, 128]
    assert [(r["T"], r["variant"]) for r in rows] == [(64, "a"), (64, "c"), (128, "a"), (128, "c")]


def test_tune_rejects_unknown_variants(stand_ins):
    with pytest.raises(SystemExit, match="unknown --variants"):
        bench.tune([64], reps=3, variants=["nope"])


def _fake_plans(monkeypatch):
    """chunk.PLANS.start replaced by one whose launchers record their arguments (and "done") in a list: (the list,
    the replacement)."""
    from linearize.kernels.hybrid_attention import chunk

    launched = []

    class Launcher:
        def __call__(self, *args):
            launched.append(args)

        def done(self):
            launched.append("done")

    def fake_start(key, stream):
        return Launcher()

    monkeypatch.setattr(chunk.PLANS, "start", fake_start)
    return launched, fake_start


def test_first_launch_us_times_the_host_work_before_the_first_launch_only(monkeypatch):
    """first_launch_us wraps chunk.PLANS.start: a call that works ~3 ms before its first launch and ~20 ms after it
    must read ~3 ms; the wrapper passes the launches through and is removed afterwards."""
    import time

    from linearize.kernels.hybrid_attention import chunk

    launched, fake_start = _fake_plans(monkeypatch)

    def op():
        time.sleep(0.003)
        launch = chunk.PLANS.start(None, None)
        launch("kernel a")
        time.sleep(0.020)
        launch("kernel b")
        launch.done()

    us = bench.first_launch_us(op, reps=3)
    assert 2_500 < us < 15_000, us
    assert launched[:3] == [("kernel a",), ("kernel b",), "done"]
    assert chunk.PLANS.start is fake_start  # the wrapper is gone
    with pytest.raises(RuntimeError, match="launched no kernel"):
        bench.first_launch_us(lambda: None, reps=1)
    # launch_us: the second launch ~20 ms after the first
    first, second = bench.launch_us(op, reps=2)
    assert 2_500 < first < 15_000 and 22_000 < second < first + 40_000, (first, second)
    assert chunk.PLANS.start is fake_start

    def once():
        chunk.PLANS.start(None, None)("kernel a")

    assert bench.launch_us(once, reps=1)[1] is None


def test_stamped_launches_fake_skips_the_launches_and_stamps_each_start(monkeypatch):
    """stamped_launches(fake=True): every launch calls on_launch and none reaches the plan's launcher (done() too),
    on_start runs once a PLANS.start; without fake the launches go through; PLANS.start is restored after a raise."""
    from linearize.kernels.hybrid_attention import chunk

    launched, fake_start = _fake_plans(monkeypatch)
    events = []

    def op():
        launch = chunk.PLANS.start(None, None)
        launch("a")
        launch("b")
        launch.done()

    with bench.stamped_launches(lambda: events.append("launch"), on_start=lambda: events.append("start"), fake=True):
        op()
    assert events == ["start", "launch", "launch"] and launched == []
    with bench.stamped_launches(lambda: events.append("launch")):
        op()
    assert launched == [("a",), ("b",), "done"]
    with pytest.raises(RuntimeError, match="inside"), bench.stamped_launches(lambda: None):
        raise RuntimeError("inside")
    assert chunk.PLANS.start is fake_start

def _pick_variant():
    """experiments/pick_variant.py as a module (experiments/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "pick_variant.py"
    spec = importlib.util.spec_from_file_location("pick_variant", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pick_variant_takes_the_fastest_at_the_longest_T_that_holds_at_the_others():
    """The pick: fastest forward+backward at the longest T by more than the slack, and within the slack of the
    baseline at every shorter T; else the baseline."""
    pick = _pick_variant().pick

    def rows(**times):  # variant -> (ms at 8K, ms at 32K)
        return [{"T": t, "variant": v, "fwd_bwd_ms": ms} for v, pair in times.items() for t, ms in zip((8192, 32768), pair)]

    assert pick(rows(default=(1.10, 4.00), a=(1.10, 3.90), b=(1.10, 3.95)), "default", 0.01) == "a"
    # a is fastest at 32K but 5% slower at 8K: the next one that holds there
    assert pick(rows(default=(1.10, 4.00), a=(1.155, 3.80), b=(1.11, 3.90)), "default", 0.01) == "b"
    # 0.5% faster is within the slack: the baseline stays
    assert pick(rows(default=(1.10, 4.00), a=(1.10, 3.98)), "default", 0.01) == "default"
    # a variant with no time at a shorter T does not hold there
    assert pick(rows(default=(1.10, 4.00), a=(None, 3.50)), "default", 0.01) == "default"
    # a tune at one T (variant_table.sh's TUNE_TS=32768, for a variant that changes nothing shorter): nothing else
    # to hold, and a slack under 1% lets a 0.8% gain through
    one = [{"T": 32768, "variant": v, "fwd_bwd_ms": ms} for v, ms in (("default", 3.80), ("a", 3.77))]
    assert pick(one, "default", 0.003) == "a"
    assert pick(one, "default", 0.01) == "default"


def test_pick_variant_applies_a_variant_to_the_source(tmp_path, monkeypatch):
    """--apply rewrites the module's ``NAME = value`` lines and LAUNCH entries a TUNE variant sets, and stops on a
    setting it cannot find."""
    module = _pick_variant()
    src = tmp_path / "chunk.py"
    src.write_text('REV_SEG = 64\nKV_SPLIT = True\nLAUNCH = {\n    "bwd_rev": (4, 2),\n    "fwd": (4, 2),\n}\n')
    monkeypatch.setitem(bench.TUNE, "t", {"REV_SEG": 128, "KV_SPLIT": False, "LAUNCH": {"bwd_rev": (8, 1)}})
    done = module.apply("t", src)
    assert done == ["REV_SEG = 128", "KV_SPLIT = False", "LAUNCH['bwd_rev'] = (8, 1)"]
    assert src.read_text() == 'REV_SEG = 128\nKV_SPLIT = False\nLAUNCH = {\n    "bwd_rev": (8, 1),\n    "fwd": (4, 2),\n}\n'
    monkeypatch.setitem(bench.TUNE, "u", {"NO_SUCH_SETTING": 1})
    with pytest.raises(SystemExit, match="NO_SUCH_SETTING"):
        module.apply("u", src)
    # a dict setting (MAXNREG, on an annotated line): the variant's entries over those of the file's line (160 here,
    # not the module's 168)
    src.write_text('MAXNREG: dict[str, int | None] = {"bwd_q": 160}\nREV_SEG = 64\n')
    monkeypatch.setitem(bench.TUNE, "v", {"MAXNREG": {"fwd": 168}})
    assert module.apply("v", src) == ["MAXNREG = {'bwd_q': 160, 'fwd': 168}"]
    assert src.read_text() == "MAXNREG = {'bwd_q': 160, 'fwd': 168}\nREV_SEG = 64\n"
    # a tuple-or-None setting on an annotated line (REV_SEG_LONG)
    src.write_text("REV_SEG_LONG: tuple[int, int] | None = None\nREV_SEG = 64\n")
    monkeypatch.setitem(bench.TUNE, "w", {"REV_SEG_LONG": (512, 128)})
    assert module.apply("w", src) == ["REV_SEG_LONG = (512, 128)"]
    assert src.read_text() == "REV_SEG_LONG = (512, 128)\nREV_SEG = 64\n"
    # the segment lengths are variants (session 20's seg_table.sh, folded into variant_table.sh)
    assert bench.TUNE["linear backward in the reverse scan, segments of 32"]["REV_SEG"] == 32


def test_every_tune_variant_names_settings_and_launches_the_kernels_have():
    """A TUNE variant's settings are chunk.py's module settings, and its LAUNCH / MAXNREG entries name launches that
    chunk.LAUNCH knows: a misspelt launch name would otherwise time the defaults under the variant's name."""
    from linearize.kernels.hybrid_attention import chunk

    launches = set(chunk.LAUNCH)
    for name, overrides in bench.TUNE.items():
        for setting, value in overrides.items():
            assert hasattr(chunk, setting), f"TUNE[{name!r}] sets {setting}, which chunk.py does not have"
            if setting in ("LAUNCH", "MAXNREG"):
                assert set(value) <= launches, f"TUNE[{name!r}] {setting} names {set(value) - launches}"
            if setting == "LAUNCH":
                assert all(len(v) == 2 and v[0] in (1, 2, 4, 8, 16) and v[1] >= 1 for v in value.values()), name


@pytest.mark.parametrize("argv,message", [(["--B", "0"], "--B must be at least 1"),
                                          (["--H", "32", "--Hkv", "6"], "--Hkv must divide --H"),
                                          (["--H", "0"], "--Hkv must divide --H")])
def test_bench_rejects_bad_shapes_before_anything_else(argv, message):
    """A batch or head count the op cannot take is named before the benchmark looks for a GPU."""
    with pytest.raises(SystemExit) as exit_:
        bench.main(argv)
    assert message in str(exit_.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run it through the device tool)")
def test_stream_probe_times_both_streams_of_the_backward(monkeypatch):
    """--stream-probe at 2K with the side stream taken from one chunk: every timed call records its events, and its
    last launch is done after the side stream's reverse pass (the dv launch waits for it) and after the op's stream
    reached that wait; the probe is switched off afterwards."""
    from linearize.kernels.hybrid_attention import chunk

    monkeypatch.setattr(chunk, "SIDE_STREAM_MIN_CHUNKS", 1)
    (row,) = bench.stream_probe(2048, 4, ["default"])
    assert row["calls"] == 4
    assert 0 < row["side_ms"] <= row["end_ms"] and 0 < row["main_ms"] <= row["end_ms"]
    assert chunk.STREAM_PROBE is None


def _table(ours32_fwd=(1.01, 0.95), peak32=2.0):
    """Rows as ``bench.main`` makes them at T = 2K, 8K and 32K (per call and queued), the op's 32K forward and peak
    as given; the peers at DESIGN.md's anchors per call, 10% faster queued."""
    rows = []
    for T in (2048, 8192, 32768):
        ours = {"op": "hybrid (ours)", "T": T, "fwd_ms": 0.2 * T / 8192, "fwd_queued_ms": 0.15 * T / 8192,
                "fwd_bwd_ms": 0.9 * T / 8192, "fwd_bwd_queued_ms": 0.8 * T / 8192, "peak_gib": 0.5 * T / 8192}
        if T == 32768:
            ours["fwd_ms"], ours["fwd_queued_ms"] = ours32_fwd
            ours["peak_gib"] = peak32
        rows.append(ours)
        for op, anchors in bench.ANCHORS.items():
            f, fb = anchors[T]
            rows.append({"op": op, "T": T, "fwd_ms": f, "fwd_queued_ms": 0.9 * f, "fwd_bwd_ms": fb,
                         "fwd_bwd_queued_ms": 0.9 * fb})
        rows.append({"op": "naive", "T": T, "skipped": "--no-naive"})
    return rows


def test_targets_judge_each_method_against_design_section_8(capsys):
    """targets(): the 32K forward at 1.01 ms per call is over 1.0 and at 0.95 queued is under; the ratios to the peers
    are (0.67 + 2.49) / 1.01 and (0.9 (0.67 + 2.49)) / 0.95; a quadratic peak is not linear; a table without 32K
    or without queued times leaves those targets undecided (None), not met or failed."""
    judged = {r["target"]: r for r in bench.targets(_table())}
    fwd = judged["T=32K forward <= 1.0 ms"]
    assert (fwd["per call_met"], fwd["queued_met"]) == (False, True)
    assert (fwd["per call_value"], fwd["queued_value"]) == ("1.010 ms", "0.950 ms")
    ratio = judged["T=32K >= 3x faster than flex SWA + fla LA, forward"]
    assert ratio["per call_value"] == f"{(0.67 + 2.49) / 1.01:.2f}x" and ratio["per call_met"] is True
    assert ratio["queued_value"] == f"{0.9 * (0.67 + 2.49) / 0.95:.2f}x" and ratio["queued_met"] is False
    sdpa2k = next(r for name, r in judged.items() if name.startswith("within 2x of SDPA"))
    assert sdpa2k["per call_met"] is True  # 0.05 / 0.086 and 0.225 / 0.40
    mem = next(r for name, r in judged.items() if name.startswith("memory linear"))
    assert mem["per call_met"] is True and mem["queued_met"] is None
    quadratic = next(r for r in bench.targets(_table(peak32=8.0)) if r["target"].startswith("memory linear"))
    assert quadratic["per call_met"] is False and quadratic["per call_value"] == "4.00"
    # only 2K and 8K, per call only: the 32K targets undecided
    short = [r for r in _table() if r["T"] < 32768]
    for r in short:
        for key in [k for k in r if "queued" in k]:
            del r[key]
    judged = {r["target"]: r for r in bench.targets(short)}
    assert judged["T=32K forward <= 1.0 ms"]["per call_met"] is None
    assert all(r["queued_met"] is None for r in judged.values())
    assert next(r for n, r in judged.items() if n.startswith("within 2x"))["per call_met"] is True
    bench.print_anchors(bench.anchor_rows(_table()), bench.targets(_table()))
    out = capsys.readouterr().out
    assert "| T=32K forward <= 1.0 ms | 1.010 ms: NOT met | 0.950 ms: met |" in out
    assert "| 32768 | flex_swa | fwd | 0.67 | 0.670 (1.00) | 0.603 (0.90) | per call |" in out


def test_anchor_rows_name_the_method_nearer_the_anchor():
    """anchor_rows(): per call at the anchor and queued 10% below it: per call is nearer, ratios 1.0 and 0.9; a peer
    timed 1% under the anchor queued and 20% over it per call reads nearer queued; skipped rows and ours are left out."""
    rows = _table()
    got = bench.anchor_rows(rows)
    assert len(got) == 3 * 3 * 2 and {r["op"] for r in got} == set(bench.ANCHORS)
    assert all(r["nearer"] == "per call" and r["per call_vs_anchor"] == 1.0 for r in got)
    assert all(abs(r["queued_vs_anchor"] - 0.9) < 1e-12 for r in got)
    flex = next(r for r in rows if r["op"] == "flex_swa" and r["T"] == 32768)
    flex["fwd_ms"], flex["fwd_queued_ms"] = 0.67 * 1.2, 0.67 * 0.99
    row = next(r for r in bench.anchor_rows(rows) if r["op"] == "flex_swa" and r["T"] == 32768 and r["part"] == "fwd")
    assert row["nearer"] == "queued"
