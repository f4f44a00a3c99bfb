"""The roofline page's merge of chunked runs, its table and plots (benchmarks/roofline.py; the runs are outside CI)."""

import pytest

from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def roofline():
    return load_benchmark("roofline")


def ground(command, start="2026-12-01 10:00:00", end="2026-12-01 10:02:00", wall=120.0, loads=(1.0, 2.0)):
    return {"command": command, "commit": "abc1234", "start_utc": start, "start_load": loads[0], "end_utc": end,
            "end_load": loads[1], "wall_s": wall}


def kvlab_run(command, contexts, bw, step_s, dtype="float32", read=1e9, lanes=(False, True)):
    rows = []
    for ctx in contexts:
        for compiled in lanes:
            s = step_s / (1.25 if compiled else 1.0)
            rows.append({"context": ctx, "compiled": compiled, "decode_tok_s": 1 / s, "bytes_read_per_step": read,
                         "achieved_bandwidth": read / s, "prefill_tok_s": 100.0,
                         **({"first_step_s": 30.0} if compiled else {})})
    return {"shape": "s", "what": f"kvlab {'fp32' if dtype == 'float32' else 'bf16'}", "dtype": dtype,
            "copy_bandwidth_bytes_s": bw, "results": rows, "ground": ground(command)}


def tf_run(command, contexts, step_s, bw=None):
    r = {"shape": "s", "what": "transformers fp32", "ground": ground(command),
         "results": [{"context": c, "decode_tok_s": 1 / step_s, "prefill_tok_s": 50.0} for c in contexts]}
    if bw is not None:
        r["copy_bandwidth_bytes_s"] = bw
    return r


def test_chunks_merge_and_the_latest_run_of_a_point_wins(roofline):
    data = {"runs": [kvlab_run("a", [1024], 10e9, 0.2), tf_run("a", [1024], 0.4),   # no copy bw: chunk a's kvlab's
                     kvlab_run("b", [1024, 4096], 8e9, 0.1), tf_run("b", [1024, 4096], 0.5, bw=4e9)]}
    pts = {(q["lane"], q["context"]): q for q in roofline.points(data)}
    assert len(pts) == 6  # eager, compiled, transformers at 1K and 4K: chunk b replaced chunk a's 1K
    assert pts["eager", 1024]["decode_tok_s"] == pytest.approx(10.0) and pts["eager", 1024]["chunk"] == 2
    assert pts["compiled", 4096]["first_step_s"] == 30.0 and pts["eager", 4096]["first_step_s"] is None
    tf = pts["transformers", 4096]
    assert tf["achieved_bandwidth"] == pytest.approx(1e9 / 0.5)  # priced with kvlab's bytes per step
    assert tf["copy_bandwidth"] == 4e9  # its own run's
    only_a = {(q["lane"], q["context"]): q for q in roofline.points({"runs": data["runs"][:2]})}
    assert only_a["transformers", 1024]["copy_bandwidth"] == 10e9  # none of its own: its chunk's kvlab run's


def test_the_table_gives_shares_ratios_and_each_chunks_ground(roofline):
    tf = tf_run("a", [1024], 0.4, bw=10e9)
    tf["ground"] = ground("a", start="2026-12-01 10:02:00", end="2026-12-01 10:04:00")  # after kvlab's run
    data = {"runs": [kvlab_run("a", [1024], 10e9, 0.2), tf, kvlab_run("c", [16384], 10e9, 0.25, dtype="bfloat16",
                                                                       read=5e8)]}
    text = roofline.table(data)
    fp32 = next(line for line in text.splitlines() if "| float32 | 1K |" in line)
    # eager 5 GB/s of 10 (50%), compiled 1.25x faster (62%), transformers half as fast (25%)
    assert "| 50% / 62% / 25% | 2.00x | 2.50x |" in fp32
    bf16 = next(line for line in text.splitlines() if "| bfloat16 | 16K |" in line)
    assert "/ - |" in bf16 and "| 20% / 25% / - |" in bf16  # no transformers lane in bf16
    assert "| 1 | `a` | abc1234 | 12-01 10:00-10:04 | 240 s | 1.0-2.0 |" in text  # kvlab + transformers runs
    eager_only = roofline.table({"runs": [kvlab_run("d", [4096], 10e9, 0.2, lanes=(False,))]})
    assert "| 5.00 / - / - | 5.0 / - / - | 10.0 | 50% / - / - | - | - | 100 / - | - | 1 |" in eager_only
    assert roofline.fmt_ctx(32752) == "~32K" and roofline.fmt_ctx(16384) == "16K"


def test_one_plot_per_shape(roofline, tmp_path):
    data = {"runs": [kvlab_run("a", [1024, 4096], 10e9, 0.2), tf_run("a", [1024, 4096], 0.4)]}
    other = kvlab_run("b", [1024], 10e9, 0.1)
    other["shape"] = "t"
    data["runs"].append(other)
    paths = roofline.plot(data, tmp_path)
    assert [p.name for p in paths] == ["roofline-s.png", "roofline-t.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def same_load_record(dtype, tf_prefill=True, ground_=None):
    r = {"shape": "s", "context": 16384, "dtype": dtype, "load": {"start": 1.5, "after_decode": 2.5},
         "copy_bandwidth_before": 10e9, "copy_bandwidth_after": 8e9, "weight_read_bytes_per_step": 6e8,
         "kv_read_bytes_per_step": 2e8, "kvlab_prefill": {"tok_s": 200.0}, "first_compiled_step_s": 40.0,
         "eager": {"median_s": 0.2, "tok_s": 5.0}, "compiled": {"median_s": 0.16, "tok_s": 6.25},
         "transformers": {"median_s": 0.5, "tok_s": 2.0},
         "transformers_prefill": {"tok_s": 100.0} if tf_prefill else None}
    if ground_:
        r["ground"] = ground_
    return r


def test_same_load_runs_join_the_roofline_as_chunks_of_their_own(roofline, tmp_path):
    """benchmarks/same_load.py's records (three lanes in turns) become an eager + compiled run and a transformers
    run: GB/s the calculated bytes over the median step, the lower copy bandwidth of the two around the decode, no
    transformers prefill where its bf16 lane decoded from a cast cache; a record's ground names its chunk."""
    sl = {"command": "benchmarks/same_load.py s.json:16k:fp32+bf16",
          "runs": [same_load_record("float32", ground_=ground("benchmarks/same_load.py s.json:16k:fp32+bf16")),
                   same_load_record("bfloat16", tf_prefill=False)]}
    data = {"runs": [kvlab_run("a", [1024], 10e9, 0.2)] + roofline.from_same_load(sl)}
    pts = {(q["lane"], q["dtype"], q["context"]): q for q in roofline.points(data)}
    e, c, t = (pts[lane, "float32", 16384] for lane in ("eager", "compiled", "transformers"))
    assert e["achieved_bandwidth"] == pytest.approx(8e8 / 0.2) and c["achieved_bandwidth"] == pytest.approx(5e9)
    assert e["copy_bandwidth"] == t["copy_bandwidth"] == 8e9 and c["first_step_s"] == 40.0
    assert t["achieved_bandwidth"] == pytest.approx(8e8 * 2.0) and t["prefill_tok_s"] == 100.0
    assert pts["transformers", "bfloat16", 16384]["prefill_tok_s"] is None
    assert pts["eager", "float32", 1024]["chunk"] == 1 and e["chunk"] == 2 and pts["eager", "bfloat16", 16384][
        "chunk"] == 3  # the bf16 record has no ground of its own: the file's command, commit unrecorded
    text = roofline.table(data)
    assert "| 4.0 / 5.0 / 1.6 | 8.0 | 50% / 62% / 20% | 2.50x | 3.12x | 200 / 100 |" in text
    assert "| 2 | `same_load.py s.json:16k:fp32+bf16` | abc1234 | 12-01 10:00-10:02 | 120 s |" in text  # one wall
    assert "| 3 | `same_load.py s.json:16k:fp32+bf16` | (not recorded) |" in text
    assert [p.name for p in roofline.plot(data, tmp_path)] == ["roofline-s.png"]


def test_add_same_load_refuses_a_file_that_is_not_a_same_load_json(roofline, tmp_path, capsys):
    """A missing file, a non-JSON file or a JSON of other records: one named error, ``--out`` not written."""
    out = tmp_path / "roofline.json"
    bad = tmp_path / "bad.json"
    bad.write_text('{"runs": [{"shape": "s"}]}')
    for f in (tmp_path / "missing.json", bad):
        with pytest.raises(SystemExit):
            roofline.main(["--add-same-load", str(f), "--out", str(out)])
        assert f"--add-same-load {f}: not a benchmarks/same_load.py JSON" in capsys.readouterr().err
    assert not out.exists()
